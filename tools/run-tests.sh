#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: the normal (Release) build with libtorch and CUDA
# compilation where available, the Python package (pip install . and its pytest suite), an
# ASan+UBSan build of the storage layers and file readers, then each libFuzzer harness briefly.
# Usage: bash tools/run-tests.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
bash tools/fetch-model.sh >/dev/null || echo "run-tests: default model not fetched; tests that need it will skip"
jobs=$(nproc)

echo "== Release build =="
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
ninja -C build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"

echo "== Python package (pip install . into a venv over Debian's python3-numpy and python3-torch) =="
# Debian's python3 (not a pyenv one) so that its numpy and torch are importable in the venv.
py=/usr/bin/python3
[ -x "$py" ] || py=python3
rm -rf .venv-test
"$py" -m venv --system-site-packages .venv-test
# With the model runtime (shotdb.Session), which links Debian's libtorch, and with CUDA where nvcc
# is found (load_kv(device="cuda"); python/tests/test_cuda.py skips its GPU cases without a device);
# `import shotdb` still loads only the engine.
.venv-test/bin/python -m pip install --quiet --disable-pip-version-check . \
  --config-settings=cmake.define.SHOTDB_WITH_TORCH=ON \
  --config-settings=cmake.define.SHOTDB_WITH_CUDA=ON
# shotdb.hf's tests (python/tests/test_hf.py) against HF transformers: 4.46 is the newest release that
# runs on Debian's torch 1.13 (no PyPI torch). Without it (offline) they skip, saying so.
.venv-test/bin/python -m pip install --quiet --disable-pip-version-check 'transformers>=4.45,<4.47' \
  || echo "run-tests: transformers not installed; python/tests/test_hf.py will skip"
SHOTDB_CLI=build/tools/shotdb .venv-test/bin/python -m pytest -q -rs python/tests

echo "== ASan+UBSan build (format, engine, tools, and gpu/ host code where nvcc is found) =="
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSHOTDB_SANITIZE=ON \
  -DSHOTDB_WITH_TORCH=OFF -DSHOTDB_BUILD_BENCH=OFF >/dev/null
ninja -C build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs"

echo "== libFuzzer: every reader of outside bytes, 15 s each (fuzz/run.sh; docs/fuzzing.md) =="
bash fuzz/run.sh 15
