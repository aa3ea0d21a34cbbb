#!/usr/bin/env python3
"""Plots per-query latency against pool size from dbsa_latency_bench --json output, and, with
--batches, the batched queries' throughput of another run against its floors.

Usage: python3 bench/plot_latency.py latency.json [latency-fp8.json ...] [--batches run.json]
       docs/latency.png
(needs matplotlib). Rows of a run with --kv-dtype other than bf16 are plotted for DBSA only, as
extra lines labelled with their K/V dtype (RetICL and FixedICL do not read stored K/V). The batch
panel plots queries per second against batch size, with what linear scaling from batch 1 would give
and the ceilings the batch's memory and compute floors set (batch / floor).
"""
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def run_name(srcs):
    """'run N' from docs/results/latency-run-n-*.json names, else the files' names."""
    names = []
    for src in srcs:
        m = re.match(r"latency-run-([a-z0-9]+)-", os.path.basename(src))
        name = "run " + m.group(1).upper() if m else os.path.basename(src)
        if name not in names:
            names.append(name)
    return ", ".join(names)


def latency_panel(ax, srcs):
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
    for m in methods:
        pts = sorted((r["pool_tokens"], r["query_ms_median"]) for r in rows if r["method"] == m)
        ax.plot([p[0] / 1000 for p in pts], [p[1] for p in pts], marker="o", label=m,
                linestyle="--" if "K/V)" in m else "-")
    ax.set_xlabel("pool size (thousand tokens)")
    ax.set_ylabel("per-query latency, median (ms)")
    ax.set_yscale("log")
    ax.set_title("DBSA vs RetICL vs FixedICL, Llama-3.1-8B shape (%s)" % run_name(srcs),
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def batch_panel(ax, src):
    rows = sorted((r for r in json.load(open(src)) if r.get("method") == "DBSA hot batch"),
                  key=lambda r: r["batch"])
    if not rows:
        sys.exit(f"{src}: no batch rows (run the bench with --batches)")
    b = [r["batch"] for r in rows]
    qps = [r["queries_per_s"] for r in rows]
    ax.plot(b, qps, marker="o", label="DBSA hot, batched (measured)")
    ax.plot(b, [qps[0] * x / b[0] for x in b], linestyle=":", color="gray",
            label="linear scaling from batch %d" % b[0])
    if all("memory_floor_ms" in r for r in rows):
        ax.plot(b, [x / r["memory_floor_ms"] * 1e3 for x, r in zip(b, rows)], linestyle="--",
                label="ceiling of the memory floor (each query's K/V + weights)")
        ax.plot(b, [x / r["compute_floor_ms"] * 1e3 for x, r in zip(b, rows)], linestyle="--",
                label="ceiling of the compute floor (FLOPs at the bf16 matmul rate)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(b)
    ax.set_xticklabels([str(x) for x in b])
    ax.set_xlabel("queries per batch")
    ax.set_ylabel("queries per second")
    ax.set_title("batched hot DBSA queries, %s-token pool (%s)"
                 % (f"{rows[0]['pool_tokens']:,}", run_name([src])), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def main(args):
    batches = None
    if "--batches" in args:
        i = args.index("--batches")
        batches = args[i + 1]
        args = args[:i] + args[i + 2:]
    if len(args) < 2:
        sys.exit(__doc__)
    srcs, dst = args[:-1], args[-1]
    fig, axes = plt.subplots(1, 2 if batches else 1, figsize=(11 if batches else 6, 4),
                             squeeze=False)
    latency_panel(axes[0][0], srcs)
    if batches:
        batch_panel(axes[0][1], batches)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])
