#!/usr/bin/env python3
"""Writes the scaled int8 K/V golden for format/kv_values_test.cc with numpy and ml_dtypes.

An independent implementation of docs/format.md's i8 layout: per (head, group of 128 tokens,
channel) a bfloat16 scale, the smallest bfloat16 >= max|x| / 127 over the group's values of the
channel (1 for zeros), then int8 codes round-half-even(x / scale), clipped to [-127, 127]. Run from
the repository root:

    pip install numpy ml_dtypes
    python3 tests/scripts/make_i8_kv_golden.py

Output: tests/fixtures/format/i8_kv_golden.json with
  kv: a [kv_heads, tokens, head_dim] float32 tensor (as float32 bits) and its raw payload (hex).
"""
import json
import pathlib

import ml_dtypes
import numpy as np

OUT = pathlib.Path("tests/fixtures/format/i8_kv_golden.json")
BF16 = ml_dtypes.bfloat16


def smallest_bf16_at_least(want):
    """The smallest bfloat16 >= each float32 of `want` (positive, finite), as uint16 bits."""
    b = want.astype(BF16)
    bits = b.view(np.uint16).copy()
    bits[b.astype(np.float32) < want] += 1  # positive: the next bfloat16 up
    return bits


def main():
    rng = np.random.default_rng(11)
    # 3 heads, 200 tokens (groups of 128 and 72), head_dim 8: head 0 small values, head 1 all
    # zeros, head 2 with two outlier channels (what pre-RoPE keys look like), one channel of
    # zeros, and one large value in the second group only.
    heads, tokens, dim, group = 3, 200, 8, 128
    x = rng.standard_normal((heads, tokens, dim)) * np.array([0.05, 0, 1.0])[:, None, None]
    x[2, :, 1] *= 40.0
    x[2, :, 6] = 25.0 + rng.standard_normal(tokens)
    x[2, :, 3] = 0.0
    x[2, 150, 0] = 90.0
    x[0, 4, 5] = -0.5  # a channel whose largest magnitude is negative
    x = x.astype(np.float32)

    groups = -(-tokens // group)
    scale_bits = np.zeros((heads, groups, dim), np.uint16)
    q = np.zeros(x.shape, np.int8)
    one = np.array([1.0], dtype=np.float32).astype(BF16).view(np.uint16)[0]
    for g in range(groups):
        xs = x[:, g * group:(g + 1) * group, :]
        amax = np.max(np.abs(xs), axis=1)  # [heads, dim], float32
        want = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
        bits = smallest_bf16_at_least(want)
        bits[amax == 0] = one
        scale_bits[:, g, :] = bits
        scale = bits.view(BF16).astype(np.float32)  # [heads, dim]
        q[:, g * group:(g + 1) * group, :] = np.clip(np.rint(xs / scale[:, None, :]), -127, 127)

    raw = scale_bits.astype("<u2").tobytes() + q.tobytes()
    kv = {"kv_heads": heads, "tokens": tokens, "head_dim": dim,
          "input_bits": [int(b) for b in x.reshape(-1).view(np.uint32)], "raw_hex": raw.hex()}
    OUT.write_text(json.dumps({"generator": f"numpy {np.__version__}, ml_dtypes "
                               f"{ml_dtypes.__version__}", "kv": kv}) + "\n")
    print(f"wrote {OUT}: {len(raw)} bytes of payload")


if __name__ == "__main__":
    main()
