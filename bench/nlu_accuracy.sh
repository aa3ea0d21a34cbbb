#!/usr/bin/env bash
# Accuracy at scale on the NLU intent data (issue 9): pools of growing size, every method at the
# same token budget, both position schemes and both BM25 analyzers. Needs the NLU data (not part
# of this repository) and the default model.
#
# Usage (from the repository root):
#   bash bench/nlu_accuracy.sh [options] CONFIG...
# where each CONFIG is  POOL:POSITIONS:BM25:COUNT:METHODS[:K[:SINKS[:WINDOW]]]
#   POOL       demonstrations sampled from the training rows (seed 1; smaller pools are prefixes
#              of larger ones), or "all" for every row;
#   POSITIONS  windowed | sequential;   BM25  retriv | rank_bm25;
#   COUNT      blocks per query before the budget (--count); "fill" = as many as the budget holds;
#   METHODS    comma-separated: dbsa, reticl, reticl-blocks, fixedicl;
#   K, SINKS, WINDOW  demonstrations per block (default 50), sink blocks (default 1) and the
#              previous blocks each block attends to (j, default 2).
# Options: --bin PATH (shotdb, default build/tools/shotdb), --data DIR (default ../shared/data),
#          --work DIR (stores and results, default /tmp/shotdb-nlu), --device cpu|cuda,
#          --dtype f32|bf16 (default f32), --kv-dtype bf16|f16|f32|f8e4m3|i8 (stored K/V, default
#          bf16; other than bf16 it is part of the store and result names), --jobs N (configs run
#          at once, default 1),
#          --limit N (first N test utterances; default all 250), --model PATH.
# Each config builds (or resumes) its pool in WORK/stores/<pool>-<positions>-<bm25>-k<K>-s<S>-j<J>
# and writes WORK/eval/<config>.json (`shotdb eval --json-out`) and .txt; a config whose .json
# exists is skipped, so an interrupted run resumes. Concurrent configs share the device: their
# latencies are not comparable, their accuracies are.
set -uo pipefail
bin=build/tools/shotdb
data=../shared/data
work=/tmp/shotdb-nlu
device=cpu
dtype=f32
kv_dtype=bf16
jobs=1
limit=0
model_args=()
configs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --kv-dtype) kv_dtype=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --limit) limit=$2; shift 2 ;;
    --model) model_args=(--model "$2"); shift 2 ;;
    -*) echo "nlu_accuracy: unknown option $1" >&2; exit 2 ;;
    *) configs+=("$1"); shift ;;
  esac
done
train=$data/nlu_evaluation_data_train.csv
test=$data/nlu_evaluation_data_test.csv
labels=$data/nlu_labels.txt
if [ ! -f "$train" ]; then echo "nlu_accuracy: no NLU data under $data" >&2; exit 2; fi
mkdir -p "$work/stores" "$work/eval" "$work/locks"
kv_tag=
[ "$kv_dtype" = bf16 ] || kv_tag="-kv$kv_dtype"
common=(--device "$device" --dtype "$dtype" --threads 2 "${model_args[@]}")

# Builds a pool once even when several configs need it at the same time (flock on its name).
build_pool() {  # POOL POSITIONS BM25 K SINKS WINDOW -> prints the store dir
  local pool=$1 positions=$2 bm25=$3 k=$4 sinks=$5 window=$6
  local name="$pool-$positions-$bm25-k$k-s$sinks-j$window$kv_tag" sample=()
  [ "$pool" = all ] || sample=(--sample "$pool" --seed 1)
  (
    flock 9
    "$bin" --store "$work/stores/$name" build --task nlu --demos "$train" --label-map "$labels" \
      "${sample[@]}" --positions "$positions" --bm25 "$bm25" -k "$k" --sink-blocks "$sinks" -j "$window" \
      --kv-dtype "$kv_dtype" "${common[@]}" >> "$work/stores/$name.build.txt" 2>&1 \
      || { echo "nlu_accuracy: build $name failed:" >&2; tail -5 "$work/stores/$name.build.txt" >&2; exit 1; }
  ) 9> "$work/locks/$name" || return 1
  echo "$work/stores/$name"
}

run_config() {  # CONFIG
  local cfg=$1 pool positions bm25 count methods k sinks window
  IFS=: read -r pool positions bm25 count methods k sinks window <<< "$cfg"
  k=${k:-50}; sinks=${sinks:-1}; window=${window:-2}
  local tag="$pool-$positions-$bm25-k$k-s$sinks-j$window$kv_tag-c$count-${methods//,/+}"
  local out="$work/eval/$tag"
  [ -f "$out.json" ] && { echo "== $tag (done before)"; return 0; }
  local store
  store=$(build_pool "$pool" "$positions" "$bm25" "$k" "$sinks" "$window") || return 1
  local sel=(--count "$count") m=()
  [ "$count" = fill ] && sel=(--count 1000000)
  IFS=, read -ra names <<< "$methods"
  for x in "${names[@]}"; do m+=(--methods "$x"); done
  local lim=()
  [ "$limit" -gt 0 ] && lim=(--limit "$limit")
  local start=$SECONDS
  if "$bin" --store "$store" eval --task nlu --test "$test" --label-map "$labels" "${lim[@]}" \
       "${sel[@]}" "${m[@]}" "${common[@]}" --json-out "$out.json.tmp" > "$out.txt" 2>&1; then
    mv "$out.json.tmp" "$out.json"
    echo "== $tag ($((SECONDS - start)) s)"
    grep -E "^(dbsa|reticl|fixedicl)" "$out.txt"
  else
    echo "nlu_accuracy: eval $tag failed:" >&2
    tail -5 "$out.txt" >&2
    return 1
  fi
}

status=0
running=0
for cfg in "${configs[@]}"; do
  run_config "$cfg" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || status=1
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done
exit $status
