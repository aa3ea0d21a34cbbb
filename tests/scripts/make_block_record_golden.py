#!/usr/bin/env python3
"""Writes golden block records for format/block_record_test.cc, from docs/format.md alone.

An independent implementation of the version-1 record layout (numpy byte shuffle, python-lz4
block codec, python-xxhash XXH3), so the C++ reader is checked against the document rather than
against itself. Run from the repository root:

    pip install numpy lz4 xxhash
    python3 tests/scripts/make_block_record_golden.py

Outputs tests/fixtures/format/<name>.shkv (a record) and <name>.raw (its decoded tensor bytes).
"""
import pathlib
import struct

import lz4.block
import numpy as np
import xxhash

OUT = pathlib.Path("tests/fixtures/format")
DTYPES = {"f32": (0, 4), "f16": (1, 2), "bf16": (2, 2), "f64": (3, 8)}
CODECS = {"raw": 0, "lz4": 1, "shuffle-lz4": 2}


def tensor(dtype, kv_heads, tokens, head_dim, seed):
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-1, 1, head_dim)
    x = rng.standard_normal((kv_heads, tokens, head_dim)) * scale
    if dtype == "f64":
        return x.astype("<f8").tobytes()
    if dtype == "f32":
        return x.astype("<f4").tobytes()
    if dtype == "f16":
        return x.astype("<f2").tobytes()
    # bf16: round-to-nearest-even of the float32 bits (no NaNs here).
    bits = x.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def shuffle(raw, elem):
    count = len(raw) // elem
    planes = np.frombuffer(raw[: count * elem], dtype=np.uint8).reshape(count, elem).T
    return planes.tobytes() + raw[count * elem :]


def record(dtype, codec, kind, layer, kv_heads, tokens, head_dim, raw):
    dcode, elem = DTYPES[dtype]
    if codec == "raw":
        payload = raw
    elif codec == "lz4":
        payload = lz4.block.compress(raw, mode="default", store_size=False)
    else:
        payload = lz4.block.compress(shuffle(raw, elem), mode="default", store_size=False)
    head = struct.pack(
        "<4sHBBB3xIIIIIQQQ",
        b"SHKV", 1, dcode, CODECS[codec], kind, layer, kv_heads, tokens, head_dim,
        xxhash.xxh3_64_intdigest(payload) & 0xFFFFFFFF,
        len(raw), len(payload), xxhash.xxh3_64_intdigest(raw),
    )
    assert len(head) == 56
    head += struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    return head + payload


CASES = [
    # name, dtype, codec, kind, layer, kv_heads, tokens, head_dim, seed
    ("raw_f32_k", "f32", "raw", 0, 3, 2, 5, 8, 1),
    ("lz4_bf16_v", "bf16", "lz4", 1, 29, 3, 40, 64, 2),
    ("shuffle_bf16_k", "bf16", "shuffle-lz4", 0, 7, 3, 40, 64, 3),
    ("shuffle_f16_v", "f16", "shuffle-lz4", 1, 0, 2, 17, 16, 4),
    ("shuffle_f64_k", "f64", "shuffle-lz4", 0, 1, 1, 9, 8, 5),
    ("lz4_f32_empty", "f32", "lz4", 1, 2, 3, 0, 64, 6),
]

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, dtype, codec, kind, layer, kv_heads, tokens, head_dim, seed in CASES:
        raw = tensor(dtype, kv_heads, tokens, head_dim, seed)
        rec = record(dtype, codec, kind, layer, kv_heads, tokens, head_dim, raw)
        (OUT / f"{name}.shkv").write_bytes(rec)
        (OUT / f"{name}.raw").write_bytes(raw)
        print(f"{name}: {len(raw)} raw bytes, {len(rec)} record bytes")
