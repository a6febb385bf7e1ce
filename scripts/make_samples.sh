#!/usr/bin/env bash
# Re-create samples/welcome.wav (needs espeak-ng and sox: apt-get install espeak-ng sox).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp --suffix=.wav)"
trap 'rm -f "$tmp"' EXIT
espeak-ng -v en-us -s 150 -w "$tmp" "Welcome to voxserve. This sample was spoken by a computer and transcribed by the tiny English Whisper model. The model store keeps the files on disk. The inference service keeps the model in memory and streams each segment as soon as it is ready. Thank you for listening."
sox "$tmp" -r 16000 -c 1 -b 16 samples/welcome.wav
