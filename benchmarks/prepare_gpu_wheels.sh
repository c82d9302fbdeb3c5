#!/usr/bin/env bash
# Wheels that the GPU machine's image lacks (it has torch, transformers, accelerate, pyarrow, tokenizers,
# sentencepiece, tqdm, filelock, tensorboard, pyyaml, pytest; no internet): downloaded here into .whl/ (git-ignored) for
# Python 3.12 on x86-64 Linux. gpu_suite.sh installs them from there; carry .whl with the call.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "zstandard>=0.22"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl "liger-kernel==0.8.5"
# Apple's Cut Cross-Entropy (Triton, pure Python): the headloss variant's single-target reference kernel.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl "cut-cross-entropy==25.1.1"
ls -l .whl
