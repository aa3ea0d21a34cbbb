#!/usr/bin/env bash
# Installs the Debian packages shotdb builds against (idempotent; needs root or sudo).
set -euo pipefail
pkgs=(cmake ninja-build g++ pkg-config
      liblmdb-dev lmdb-utils liblz4-dev libxxhash-dev
      libgtest-dev libgmock-dev libbenchmark-dev
      libtorch-dev libopenblas0-pthread
      libcli11-dev nlohmann-json3-dev libfmt-dev libpcre2-dev
      libstemmer-dev liblingua-stopwords-perl clang libclang-rt-14-dev
      python3 python3-pip python3-venv python3-numpy python3-torch python3-pytest unzip)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "install-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-deps: ok"
