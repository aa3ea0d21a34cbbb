#!/usr/bin/env python3
"""load_kv of a 1 GiB task into torch on the CPU, against numpy.fromfile of the same bytes (issue 10).

The task has Llama-3.1-8B's K/V shape (32 layers, 8 KV heads, head_dim 128, bf16) in blocks of 1,024
tokens; 8 blocks make 1 GiB of raw K/V in 512 records of 2 MiB. The same bytes are also written to
one flat file. Both sides are timed with the page cache hot (one untimed warm-up each), median of
--repeat runs, in this one process:

  shotdb   store.load_kv(task, all blocks) (every record's xxh3 checksum verified, zero-copy views of
           the memory map) + torch.from_dlpack of every K and V;
  fromfile numpy.fromfile of the flat file (one read into a fresh buffer) + torch.from_numpy;
  floor    one copy of 1 GiB in memory (numpy.copyto), the bytes' cost if they must be touched once.

Usage: python3 bench/load_kv_bench.py [--dir /tmp/shotdb-load-kv] [--gib 1] [--repeat 5]
"""
import argparse
import os
import shutil
import statistics
import time

import numpy as np
import torch

import shotdb

LAYERS, HEADS, DIM, TOKENS = 32, 8, 128, 1024


def timed(fn, repeat):
    fn()  # warm-up: page cache, allocator
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/shotdb-load-kv")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    record = HEADS * TOKENS * DIM * 2
    blocks = max(1, round(args.gib * 2**30 / (record * 2 * LAYERS)))
    total = blocks * LAYERS * 2 * record

    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    path, flat = os.path.join(args.dir, "store"), os.path.join(args.dir, "flat.bin")
    rng = np.random.default_rng(1)
    with shotdb.Store(path, sync=False) as store, open(flat, "wb") as out:
        store.create_task("kv", architecture="llama@bench", dtype="bf16", tokenizer_hash="bench",
                          num_layers=LAYERS, kv_heads=HEADS, head_dim=DIM, labels=["x"])
        for b in range(blocks):
            keys = [rng.integers(0, 2**16, (HEADS, TOKENS, DIM), dtype=np.uint16)
                    for _ in range(LAYERS)]
            values = [rng.integers(0, 2**16, (HEADS, TOKENS, DIM), dtype=np.uint16)
                      for _ in range(LAYERS)]
            store.append_block("kv", keys, values, [(b, f"demo {b}", "x")])
            for k, v in zip(keys, values):
                out.write(k.tobytes())
                out.write(v.tobytes())

    store = shotdb.Store(path, readonly=True)
    every = list(range(blocks))

    def via_shotdb():
        kv = store.load_kv("kv", every)
        tensors = []
        for layer in range(LAYERS):
            for b in range(blocks):
                tensors.append(torch.from_dlpack(kv.key(layer, b)))
                tensors.append(torch.from_dlpack(kv.value(layer, b)))
        assert sum(t.numel() for t in tensors) * 2 == total
        return tensors

    def via_fromfile():
        a = np.fromfile(flat, dtype=np.int16)
        return torch.from_numpy(a).view(torch.bfloat16)

    src = np.fromfile(flat, dtype=np.uint8)
    dst = np.empty_like(src)
    shotdb_s = timed(via_shotdb, args.repeat)
    fromfile_s = timed(via_fromfile, args.repeat)
    floor_s = timed(lambda: np.copyto(dst, src), args.repeat)
    gib = total / 2**30
    print(f"{gib:.2f} GiB: {blocks} blocks x {LAYERS} layers x K,V of [{HEADS}, {TOKENS}, {DIM}] "
          f"bf16 ({record / 2**20:.0f} MiB records)")
    print(f"{'path':28} {'seconds':>8} {'GB/s':>7} {'vs fromfile':>12} {'vs floor':>9}")
    for name, s in (("shotdb load_kv + from_dlpack", shotdb_s), ("numpy.fromfile + from_numpy",
                                                                 fromfile_s),
                    ("floor: one memory copy", floor_s)):
        print(f"{name:28} {s:8.3f} {total / s / 1e9:7.2f} {s / fromfile_s:11.3f}x "
              f"{s / floor_s:8.2f}x")


if __name__ == "__main__":
    main()
