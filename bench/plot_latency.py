#!/usr/bin/env python3
"""Plots per-query latency against pool size from dbsa_latency_bench --json output.

Usage: python3 bench/plot_latency.py latency.json [latency-fp8.json ...] docs/latency.png
(needs matplotlib). Rows of a run with --kv-dtype other than bf16 are plotted for DBSA only, as
extra lines labelled with their K/V dtype (RetICL and FixedICL do not read stored K/V).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(srcs, dst):
    rows = []
    for src in srcs:
        for r in json.load(open(src)):
            if "query_ms_median" not in r:  # batch-throughput rows
                continue
            kv = r.get("kv_dtype", "bf16")
            if kv != "bf16":
                if not r["method"].startswith("DBSA"):
                    continue
                r = dict(r, method=f"{r['method']} ({kv} K/V)")
            rows.append(r)
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = sorted((r["pool_tokens"], r["query_ms_median"]) for r in rows if r["method"] == m)
        ax.plot([p[0] / 1000 for p in pts], [p[1] for p in pts], marker="o", label=m,
                linestyle="--" if "K/V)" in m else "-")
    ax.set_xlabel("pool size (thousand tokens)")
    ax.set_ylabel("per-query latency, median (ms)")
    ax.set_yscale("log")
    ax.set_title("DBSA vs RetICL vs FixedICL, Llama-3.1-8B shape, bf16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:-1], sys.argv[-1])
