#!/usr/bin/env python3
"""Writes the weight-reader fixtures under tests/fixtures/weights/ with independent writers:

- tiny.gguf: written by the `gguf` package's GGUFWriter: metadata of every value type (nested
  arrays too) and tensors of every supported type, the quantized ones made by gguf.quants.quantize;
- tiny.golden.json: the float32 values gguf.quants.dequantize (ggml's reference algorithm) gives
  for each tensor, as hex of little-endian float32 so the comparison is bit-exact;
- st_single/model.safetensors and st_sharded/ (two shards + model.safetensors.index.json): written
  by the `safetensors` package, with their values in st.golden.json.

Usage: python3 tests/scripts/make_weight_fixtures.py   (pip install gguf safetensors numpy)
"""
import json
import os

import gguf
import numpy as np
from gguf import quants
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "weights")
rng = np.random.default_rng(1234)


def hexf32(a):
    return np.ascontiguousarray(a, dtype="<f4").tobytes().hex()


def write_gguf(path, alignment=None):
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_float32("t.f32", 0.15625)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1.0 / 3.0)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo wörld")
    w.add_array("t.strs", ["a", "", "ünïcode", "x y"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.nested", [[1, 2], [3]])
    golden = {}
    x = (np.random.default_rng(99).standard_normal((3, 64)) * np.array([0.01, 1, 30])[:, None]).astype(np.float32)
    golden["f32"] = x
    w.add_tensor("f32", x)
    h = x.astype(np.float16)
    golden["f16"] = h.astype(np.float32)
    w.add_tensor("f16", h)
    for name, t in (("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0),
                    ("q4_1", gguf.GGMLQuantizationType.Q4_1), ("bf16", gguf.GGMLQuantizationType.BF16)):
        q = quants.quantize(x, t)
        golden[name] = quants.dequantize(q, t).astype(np.float32)
        w.add_tensor(name, q, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return golden


def main():
    os.makedirs(OUT, exist_ok=True)
    golden = write_gguf(os.path.join(OUT, "tiny.gguf"))
    write_gguf(os.path.join(OUT, "tiny_align64.gguf"), alignment=64)
    with open(os.path.join(OUT, "tiny.golden.json"), "w") as f:
        json.dump({k: {"shape": list(v.shape), "f32_hex": hexf32(v)} for k, v in golden.items()}, f)

    a = rng.standard_normal((4, 5)).astype(np.float32)
    b = rng.standard_normal((7,)).astype(np.float16)
    c = rng.standard_normal((2, 3)).astype(np.float64)
    os.makedirs(os.path.join(OUT, "st_single"), exist_ok=True)
    save_file({"a": a, "b": b, "c": c}, os.path.join(OUT, "st_single", "model.safetensors"),
              metadata={"format": "pt"})
    d = os.path.join(OUT, "st_sharded")
    os.makedirs(d, exist_ok=True)
    save_file({"a": a, "b": b}, os.path.join(d, "model-00001-of-00002.safetensors"))
    save_file({"c": c}, os.path.join(d, "model-00002-of-00002.safetensors"))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                  "b": "model-00001-of-00002.safetensors",
                                                  "c": "model-00002-of-00002.safetensors"}}, f)
    with open(os.path.join(OUT, "st.golden.json"), "w") as f:
        json.dump({k: {"shape": list(v.shape), "f32_hex": hexf32(v.astype(np.float32))}
                   for k, v in (("a", a), ("b", b), ("c", c))}, f)


if __name__ == "__main__":
    main()
