#!/usr/bin/env python3
"""Writes fp8 E4M3 goldens for format/kv_values_test.cc with ml_dtypes (Google's numpy float8).

An independent implementation of e4m3fn decoding and round-to-nearest-even encoding, and of the
scaled fp8 K/V layout of docs/format.md (per-head float32 scale = max|x| / 448, codes of x / scale),
so the C++ code is checked against another library and the document. Run from the repository root:

    pip install numpy ml_dtypes
    python3 tests/scripts/make_fp8_golden.py

Output: tests/fixtures/format/fp8_e4m3_golden.json with
  decode: the float value of each of the 256 codes ("nan" for NaN codes);
  encode: [float32 bits, code] pairs for inputs below the saturation point (ml_dtypes turns
          overflow into NaN where shotdb saturates; saturation is tested from the spec instead);
  kv:     a [kv_heads, tokens, head_dim] float32 tensor (as float32 bits) and its raw payload (hex).
"""
import json
import pathlib

import ml_dtypes
import numpy as np

OUT = pathlib.Path("tests/fixtures/format/fp8_e4m3_golden.json")
F8 = ml_dtypes.float8_e4m3fn


def main():
    codes = np.arange(256, dtype=np.uint8)
    values = codes.view(F8).astype(np.float32)
    decode = ["nan" if np.isnan(v) else float(v) for v in values]

    # Inputs: every finite code's value, the midpoints between neighbours (ties) and points just
    # off them, subnormal range, and random values over the whole range.
    finite = np.sort(np.unique(values[~np.isnan(values)].astype(np.float64)))
    mids = (finite[:-1] + finite[1:]) / 2
    rng = np.random.default_rng(7)
    xs = np.concatenate([
        finite, mids,
        np.nextafter(mids.astype(np.float32), np.float32(np.inf)).astype(np.float64),
        np.nextafter(mids.astype(np.float32), np.float32(-np.inf)).astype(np.float64),
        rng.uniform(-463.9, 463.9, 4000), rng.uniform(-0.02, 0.02, 2000),
        np.exp(rng.uniform(np.log(1e-6), np.log(460), 2000)) * rng.choice([-1, 1], 2000),
        [0.0, -0.0, 1e-30, -1e-30, 2.0**-10, 2.0**-10 * 1.0000001, 463.99, -463.99],
    ]).astype(np.float32)
    xs = xs[np.abs(xs) < 464]
    enc = xs.astype(F8).view(np.uint8)
    encode = [[int(b), int(c)] for b, c in zip(xs.view(np.uint32), enc)]

    # A scaled fp8 K/V tensor: 3 heads (one all zeros), 7 tokens, head_dim 8.
    heads, tokens, dim = 3, 7, 8
    x = (rng.standard_normal((heads, tokens, dim)) * np.array([0.05, 0, 30.0])[:, None, None])
    x = x.astype(np.float32)
    raw = bytearray()
    codes_all = []
    for h in range(heads):
        amax = np.float32(np.max(np.abs(x[h])))
        scale = np.float32(amax / np.float32(448.0)) if amax > 0 else np.float32(1.0)
        raw += np.array([scale], dtype="<f4").tobytes()
        codes_all.append((x[h] / scale).astype(np.float32).astype(F8).view(np.uint8).tobytes())
    for c in codes_all:
        raw += c
    kv = {"kv_heads": heads, "tokens": tokens, "head_dim": dim,
          "input_bits": [int(b) for b in x.reshape(-1).view(np.uint32)], "raw_hex": raw.hex()}

    OUT.write_text(json.dumps({"generator": f"ml_dtypes {ml_dtypes.__version__}",
                               "decode": decode, "encode": encode, "kv": kv}) + "\n")
    print(f"wrote {OUT}: {len(encode)} encode pairs")


if __name__ == "__main__":
    main()
