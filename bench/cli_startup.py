#!/usr/bin/env python3
"""Start-up cost of the shotdb CLI (issue 10): `shotdb ls` and friends against `mdb_stat` (LMDB's
own tool) on the same store, and against `shotdb-model ls` (the same command in the binary that
links libtorch, i.e. what every command cost before the split). Wall time per run, median of N.

Usage: python3 bench/cli_startup.py STORE [--bin build/tools] [--runs 50]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import time


def time_runs(argv, runs):
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"cli_startup: {' '.join(argv)} exited {done.returncode}")
    return statistics.median(samples) * 1000, min(samples) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("--bin", default="build/tools")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    shotdb = os.path.join(args.bin, "shotdb")
    model = os.path.join(args.bin, "shotdb-model")
    mdb_stat = shutil.which("mdb_stat")
    cases = [("mdb_stat -a (baseline)", [mdb_stat, "-a", args.store])] if mdb_stat else []
    cases += [
        ("shotdb ls", [shotdb, "--store", args.store, "ls"]),
        ("shotdb --help", [shotdb, "--help"]),
        ("shotdb stats", [shotdb, "--store", args.store, "stats"]),
    ]
    if os.path.exists(model):
        cases.append(("shotdb-model ls (links libtorch)", [model, "--store", args.store, "ls"]))
    results = [(name, *time_runs(argv, args.runs)) for name, argv in cases]
    base = results[0][1] if mdb_stat else None
    print(f"{'command':36} {'median ms':>10} {'min ms':>8} {'vs mdb_stat':>12}")
    for name, median, fastest in results:
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"{name:36} {median:10.2f} {fastest:8.2f} {ratio:>12}")


if __name__ == "__main__":
    main()
