#!/usr/bin/env bash
# The main job: install, start the model store and the inference service on localhost,
# make sure the embedded tiny.en model is in the store, transcribe samples/welcome.wav
# with the segments streamed to this terminal, then stop both services.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
