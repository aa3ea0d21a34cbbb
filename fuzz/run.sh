#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, ASan+UBSan) and runs each for SECONDS (default 60), starting
# from the committed seeds (fuzz/seeds/<harness>) and the test fixtures that are valid inputs.
# Prints, per harness, the executions, the run time and the corpus size; any crash, leak, timeout
# or sanitizer report fails the run (exit 1), with the reproducer left in build-fuzz/artifacts/.
# Usage (repository root): bash fuzz/run.sh [SECONDS] [HARNESS...]
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(fuzz_gguf fuzz_safetensors fuzz_config_json
  fuzz_tokenizer_json fuzz_spm_model fuzz_demo_file fuzz_import fuzz_block_record)

cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_COMPILER=clang++ -DSHOTDB_FUZZ=ON -DSHOTDB_WITH_TORCH=OFF -DSHOTDB_WITH_CUDA=OFF \
  -DSHOTDB_BUILD_TESTS=OFF -DSHOTDB_BUILD_BENCH=OFF > /dev/null || exit 1
ninja -C build-fuzz "${harnesses[@]}" > build-fuzz/build.log 2>&1 \
  || { grep -E "error" -A3 build-fuzz/build.log | head -40; exit 1; }

seeds_for() {
  case "$1" in
    fuzz_gguf) echo tests/fixtures/tokenizer tests/fixtures/weights ;;
    fuzz_safetensors) echo fuzz/seeds/safetensors tests/fixtures/weights/st_single \
                           tests/fixtures/weights/st_sharded ;;
    fuzz_config_json) echo tests/fixtures/model/tiny_llama tests/fixtures/model/tiny_llama3 \
                           tests/fixtures/model/tiny_qwen2 fuzz/seeds/config_json_regressions ;;
    fuzz_tokenizer_json) echo fuzz/seeds/tokenizer_json ;;
    fuzz_spm_model) echo tests/fixtures/tokenizer fuzz/seeds/spm_model_regressions ;;
    fuzz_demo_file) echo fuzz/seeds/demo_file ;;
    fuzz_import) echo fuzz/seeds/import ;;
    fuzz_block_record) echo tests/fixtures/format ;;
  esac
}

mkdir -p build-fuzz/artifacts
status=0
printf '%-20s %10s %8s %9s %8s  %s\n' harness execs seconds exec/s corpus result
for h in "${harnesses[@]}"; do
  corpus=build-fuzz/corpus/$h
  mkdir -p "$corpus"
  log=build-fuzz/$h.log
  # -rss_limit_mb: the harnesses load whole inputs; -max_len keeps inputs near real file sizes.
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    build-fuzz/fuzz/$h "$corpus" $(seeds_for "$h") -max_total_time="$seconds" -timeout=10 \
      -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix=build-fuzz/artifacts/"$h"- > "$log" 2>&1
  rc=$?
  execs=$(grep -m1 "stat::number_of_executed_units" "$log" | awk '{print $2}')
  secs=$(grep -m1 "stat::average_exec_per_sec" "$log" | awk '{print $2}')
  files=$(ls "$corpus" | wc -l)
  result=ok
  if [ $rc -ne 0 ]; then
    result="FAILED (rc $rc): $(grep -m1 -E "ERROR|runtime error|deadly signal|Timeout" "$log")"
    status=1
  fi
  printf '%-20s %10s %8s %9s %8s  %s\n' "$h" "${execs:-?}" "$seconds" "${secs:-?}" "$files" "$result"
done
exit $status
