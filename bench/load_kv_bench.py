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

With --device cuda (the package built with SHOTDB_WITH_CUDA=ON, on a GPU machine) it times the
same bytes onto the GPU instead, against the PCIe floor measured in the same run:

  cold     store.load_kv(task, all blocks, device="cuda") with the device page cache cleared
           before each run (every page a miss: straight from the page-locked map, checksums
           verified on the host while the DMA runs) + torch.from_dlpack of every K and V;
  warm     the same with every page cached (hits: no copy);
  via cpu  load_kv on the CPU + torch.from_dlpack(a).to("cuda") of every array (pageable copies);
  floor    one pinned host -> device copy of the same number of bytes with torch (non_blocking,
           then synchronize): bytes / the measured pinned H2D bandwidth.

Usage: python3 bench/load_kv_bench.py [--dir /tmp/shotdb-load-kv] [--gib 1] [--repeat 5]
                                      [--device cpu|cuda]
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


def timed(fn, repeat, setup=None):
    if setup:
        setup()
    fn()  # warm-up: page cache, allocator
    samples = []
    for _ in range(repeat):
        if setup:
            setup()  # not timed
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_cuda(store, every, blocks, total, repeat):
    """load_kv(device="cuda") cold and warm, and load_kv + .to("cuda"), against a pinned copy."""
    device = torch.device("cuda", torch.cuda.current_device())

    def via_shotdb():
        kv = store.load_kv("kv", every, device="cuda")
        tensors = []
        for layer in range(LAYERS):
            for b in range(blocks):
                tensors.append(torch.from_dlpack(kv.key(layer, b)))
                tensors.append(torch.from_dlpack(kv.value(layer, b)))
        assert tensors[0].is_cuda and sum(t.numel() for t in tensors) * 2 == total
        return tensors

    def via_cpu():
        kv = store.load_kv("kv", every)
        tensors = []
        for layer in range(LAYERS):
            for b in range(blocks):
                tensors.append(torch.from_dlpack(kv.key(layer, b)).to(device))
                tensors.append(torch.from_dlpack(kv.value(layer, b)).to(device))
        torch.cuda.synchronize(device)
        return tensors

    src = torch.empty(total, dtype=torch.uint8).pin_memory()
    dst = torch.empty(total, dtype=torch.uint8, device=device)

    def pinned_copy():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)

    cold_s = timed(via_shotdb, repeat, setup=lambda: store._cuda_clear("cuda"))
    stats = store._cuda_stats("cuda")
    warm_s = timed(via_shotdb, repeat)
    cpu_s = timed(via_cpu, repeat)
    floor_s = timed(pinned_copy, repeat)
    print(f"{total / 2**30:.2f} GiB: {blocks} blocks x {LAYERS} layers x K,V of "
          f"[{HEADS}, {TOKENS}, {DIM}] bf16 onto {torch.cuda.get_device_name(device)}")
    print(f"pinned H2D (torch): {total / floor_s / 1e9:.1f} GB/s; Stager: "
          f"{stats['bytes_from_map'] / 2**30:.2f} GiB straight from the map, "
          f"map_status {stats['map_status'] or 'ok'}, map registered in "
          f"{stats['map_register_ms']:.0f} ms (once)")
    print(f"{'path':42} {'seconds':>8} {'GB/s':>7} {'vs PCIe floor':>14}")
    for name, s in (("load_kv(cuda) cold: misses, verified", cold_s),
                    ("load_kv(cuda) warm: cache hits", warm_s),
                    ("load_kv(cpu) + from_dlpack(a).to(cuda)", cpu_s),
                    ("floor: pinned H2D copy (torch)", floor_s)):
        print(f"{name:42} {s:8.3f} {total / s / 1e9:7.2f} {s / floor_s:13.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/shotdb-load-kv")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
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

    # The device page cache must hold the whole task for the warm runs.
    store = shotdb.Store(path, readonly=True, cuda_cache_gb=max(4.0, 1.5 * total / 2**30))
    every = list(range(blocks))
    if args.device == "cuda":
        bench_cuda(store, every, blocks, total, args.repeat)
        return

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
