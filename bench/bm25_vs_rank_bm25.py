#!/usr/bin/env python3
"""Times rank_bm25 (BM25Okapi get_scores + argsort) on the workload of bench/bm25_bench.cc.

Index: the first 400 blocks of 50 NLU training rows (386 blocks: the file has 19,287 rows), each
block's texts joined by "\\n" and tokenized "lower,nonalnum" exactly as shotdb does (the tokenizer of
tests/scripts/make_bm25_golden.py); queries: the 250 test utterances. One query = get_scores plus
np.argsort(scores)[::-1][:k], as rank_bm25's get_top_n does. Prints microseconds per query.

With --cpp-bench PATH it also runs shotdb's bm25_bench binary (JSON output) and prints the ratio
rank_bm25 / shotdb for Bm25TopK and for the score-every-block baseline at the same k.

Usage: python3 bench/bm25_vs_rank_bm25.py [--data-dir ../shared/data] [--cpp-bench build/bench/bm25_bench]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import rank_bm25

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
import make_bm25_golden as golden  # noqa: E402  (the shared tokenizer and CSV reader)

KS = (10, 116)  # 116 = 30% of 386 blocks, the paper's selection ratio


def time_rank_bm25(data_dir, repeats):
    train = golden.read_csv_texts(os.path.join(data_dir, "nlu_evaluation_data_train.csv"))
    test = golden.read_csv_texts(os.path.join(data_dir, "nlu_evaluation_data_test.csv"))
    rows = train[:golden.BLOCK_ROWS * golden.MAX_BLOCKS]
    blocks = ["\n".join(rows[i:i + golden.BLOCK_ROWS])
              for i in range(0, len(rows), golden.BLOCK_ROWS)]
    bm25 = rank_bm25.BM25Okapi([golden.tokenize(b) for b in blocks])
    queries = [golden.tokenize(q) for q in test]
    results = {}
    for k in KS:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for q in queries:
                np.argsort(bm25.get_scores(q))[::-1][:k]
            best = min(best, time.perf_counter() - start)
        results[k] = best * 1e6 / len(queries)
    return len(blocks), len(queries), results


def run_cpp_bench(path, data_dir):
    out = subprocess.run([path, "--benchmark_format=json", data_dir], check=True,
                         capture_output=True, text=True).stdout
    # The binary prints one summary line before the JSON document.
    report = json.loads(out[out.index("{"):])
    per_query = {}
    for b in report["benchmarks"]:
        name, k = b["name"].split("/")[:2]
        per_query[(name, int(k))] = b["us_per_query"]
    return per_query


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get(
        "SHOTDB_DATA_DIR", os.path.join(ROOT, "..", "shared", "data")))
    parser.add_argument("--cpp-bench", help="path of the bm25_bench binary")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data_dir, "nlu_evaluation_data_train.csv")):
        print("bm25_vs_rank_bm25: skipped: no NLU data under", args.data_dir)
        return
    num_blocks, num_queries, py = time_rank_bm25(args.data_dir, args.repeats)
    print(f"{num_blocks} blocks, {num_queries} queries; best of {args.repeats} passes")
    cpp = run_cpp_bench(args.cpp_bench, args.data_dir) if args.cpp_bench else {}
    for k in KS:
        line = f"k={k:4d}  rank_bm25 get_scores+argsort: {py[k]:8.1f} us/query"
        if cpp:
            topk = cpp[("BM_Bm25TopK", k)]
            full = cpp[("BM_Bm25ScoreAll", k)]
            line += (f" | shotdb Bm25TopK: {topk:6.1f} us/query ({py[k] / topk:5.1f}x faster)"
                     f" | shotdb score-all: {full:6.1f} us/query ({py[k] / full:5.1f}x faster)")
        print(line)


if __name__ == "__main__":
    main()
