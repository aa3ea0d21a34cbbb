#!/usr/bin/env bash
# One run on the GPU machine: build with CUDA and the machine's libtorch, run the tests (GPU tests
# included), then the benchmarks. Output goes to stdout and, when $OUT is set, to files under it.
# Prepare on the development machine first: bash ../shared/device/fetch-deps.sh (see docs/gpu.md).
# Usage (from the repository root, on the GPU machine):
#   source .device/setup.sh && bash bench/run-gpu.sh [--quick | --no-latency]
# CMAKE_EXTRA adds configure options (e.g. -DSHOTDB_WITH_CUDA=OFF to skip gpu/).
set -uo pipefail
out=${OUT:-/tmp/shotdb-gpu-out}
mkdir -p "$out"
mode=${1:-full}  # full | --quick (small latency run) | --no-latency (build, tests, h2d only)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHOTDB_BUILD_TESTS=ON \
  -DSHOTDB_BUILD_BENCH=ON -DCMAKE_CUDA_ARCHITECTURES=90 ${CMAKE_EXTRA:-} > "$out/cmake.log" 2>&1 \
  || { tail -40 "$out/cmake.log"; exit 1; }
ninja -C build-gpu -j16 > "$out/build.log" 2>&1 || { grep -E "error|Error" -A5 "$out/build.log" | head -60; exit 1; }
echo "== build ok"

ctest --test-dir build-gpu -j8 --output-on-failure > "$out/ctest.log" 2>&1
grep -E "tests passed|tests failed|Failed|\*\*\*|Cuda" "$out/ctest.log" | tail -30
build-gpu/query/query_dbsa_test --gtest_filter='*Cuda*' 2>&1 | tail -8
build-gpu/gpu/gpu_device_test 2>&1 | tail -4

build-gpu/bench/h2d_bench --mb 1024 --json "$out/h2d.json" 2>&1 | tee "$out/h2d_bench.txt"
# Blocks of 256 tokens (512 KiB records): the shape of the earlier runs, and more, smaller copies.
build-gpu/bench/h2d_bench --mb 1024 --block-tokens 256 --json "$out/h2d_256.json" 2>&1 \
  | tee "$out/h2d_bench_256.txt" | grep -E "stager|pinned"
# DBSA's blocks (k = 5, ~95 tokens: 190 KiB records).
build-gpu/bench/h2d_bench --mb 1024 --block-tokens 95 --json "$out/h2d_95.json" 2>&1 \
  | tee "$out/h2d_bench_95.txt" | grep -E "stager|pinned"

# One launch per layer for a batch of DBSA queries against one per query (docs/results.md run W).
build-gpu/bench/paged_attention_bench --reps 20 --batch 1,4,16,64 --rows 18 2>&1 \
  | tee "$out/paged_attention_batch.txt"

case "$mode" in
  --no-latency) ;;
  --quick) build-gpu/bench/dbsa_latency_bench --layers 4 --pools 30000 --queries 4 \
             --json "$out/latency.json" ;;
  *) build-gpu/bench/dbsa_latency_bench --pools 30000,60000,90000 --queries 8 \
       --json "$out/latency.json" 2>&1 | tee "$out/latency.txt"
     # Half-size K/V (int8 with a scale per channel; docs/results.md run V): the cold query.
     build-gpu/bench/dbsa_latency_bench --pools 90000 --queries 8 --batches "" --kv-dtype i8 \
       --json "$out/latency-i8.json" 2>&1 | tee "$out/latency-i8.txt" ;;
esac
