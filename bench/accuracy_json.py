#!/usr/bin/env python3
"""Collects the `shotdb eval --json-out` files that bench/nlu_accuracy.sh wrote into one list of
rows, the machine-readable form of docs/results.md's accuracy tables (docs/results/accuracy.json).

Each row: {"dataset", "pool_demos", "positions", "analyzer", "method", "queries", "accuracy",
"context_tokens"} as issue 9 specifies, plus how the pool was cut and selected ("demos_per_block",
"sink_blocks", "window", "selection": "fill" = as many blocks as the context budget holds, or a
block count), "mean_selected" (blocks, or demonstrations for reticl), "budget_bound_fraction",
and the "machine" and "date" given on the command line. The configuration comes from the file
name that nlu_accuracy.sh gives each eval: <pool>-<positions>-<bm25>-k<K>-s<S>-j<J>-c<count>-<methods>.

Usage: python3 bench/accuracy_json.py --machine "H200, f32" --date 2026-11-30 [--merge OLD.json]
           EVAL.json... > out.json
(--merge keeps the rows of an earlier output, e.g. another machine's, and adds these.)
"""
import argparse
import json
import os
import re
import sys

NAME = re.compile(r"^(?P<pool>\d+|all)-(?P<positions>windowed|sequential)-(?P<bm25>retriv|rank_bm25)"
                  r"-k(?P<k>\d+)-s(?P<s>\d+)-j(?P<j>\d+)-c(?P<count>\w+)-(?P<methods>[\w+-]+)$")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machine", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--all-demos", type=int, default=19287,
                        help="pool size that the name 'all' stands for")
    parser.add_argument("--merge", help="an earlier output whose rows are kept")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    rows = []
    if args.merge:
        with open(args.merge, encoding="utf-8") as f:
            rows = json.load(f)
    for path in args.files:
        m = NAME.match(os.path.basename(path)[: -len(".json")])
        if not m:
            sys.exit(f"accuracy_json: {path}: not a name bench/nlu_accuracy.sh writes")
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        for r in report["results"]:
            rows.append({
                "dataset": "nlu",
                "pool_demos": args.all_demos if m["pool"] == "all" else int(m["pool"]),
                "positions": m["positions"],
                "analyzer": m["bm25"],
                "method": r["method"],
                "queries": r["queries"],
                "accuracy": round(r["accuracy"], 4),
                "context_tokens": round(r["mean_context_tokens"], 1),
                "demos_per_block": int(m["k"]),
                "sink_blocks": int(m["s"]),
                "window": int(m["j"]),
                "selection": m["count"],
                "mean_selected": round(r.get("mean_selected", 0), 1),
                "budget_bound_fraction": round(r.get("budget_bound_fraction", 0), 3),
                "machine": args.machine,
                "date": args.date,
            })
    order = {"dbsa": 0, "reticl": 1, "reticl-blocks": 2, "fixedicl": 3}
    rows.sort(key=lambda r: (r["pool_demos"], r["demos_per_block"], r["selection"],
                             r["positions"] != "windowed", r["analyzer"], r["sink_blocks"],
                             order.get(r["method"], 9)))
    json.dump(rows, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
