#!/usr/bin/env bash
# Regenerate the small speech/silence clips in tests/data with espeak-ng and sox.
#
# The committed files are what the tests use; this script documents how they were made.
# Requires the Debian packages espeak-ng and sox (with libsox-fmt-all for ogg/vorbis).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/../tests/data}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

voice="en-us"
speed=140   # words per minute: slow enough for tiny.en to hear every word

short_text="Please send the report to my office today."
multi_texts=(
  "Good morning and welcome to the weekly meeting."
  "First, the new test server is finally online."
  "Second, please review the budget before Friday."
  "Third, the design team needs two more testers."
  "The office will be closed on Monday."
  "Thank you all, and see you next week."
)

speak() {  # speak TEXT OUT.wav -> 16 kHz mono 16-bit wav
  espeak-ng -v "$voice" -s "$speed" -w "$work/raw.wav" "$1"
  sox "$work/raw.wav" -r 16000 -c 1 -b 16 "$2"
}

speak "$short_text" "$out/speech_short.wav"
sox "$out/speech_short.wav" -C 3 "$out/speech_short.ogg"

sox -n -r 16000 -c 1 -b 16 "$work/pause.wav" trim 0 1.0
parts=()
for i in "${!multi_texts[@]}"; do
  speak "${multi_texts[$i]}" "$work/part$i.wav"
  parts+=("$work/part$i.wav" "$work/pause.wav")
done
unset 'parts[-1]'   # no pause after the last sentence
sox "${parts[@]}" "$out/speech_multi.wav"

sox -D -n -r 16000 -c 1 -b 16 "$out/silence.wav" trim 0 5.0   # -D: no dither, exact zeros

multi_joined="$(printf '%s ' "${multi_texts[@]}")"
python3 - "$out/transcripts.json" "$short_text" "${multi_joined% }" <<'PY'
import json, sys
path, short, multi = sys.argv[1:4]
texts = {
    "speech_short.wav": short,
    "speech_short.ogg": short,
    "speech_multi.wav": multi,
    "silence.wav": "",
}
with open(path, "w", encoding="utf-8") as f:
    json.dump(texts, f, indent=2)
    f.write("\n")
PY

for f in speech_short.wav speech_short.ogg speech_multi.wav silence.wav; do
  printf '%-18s %6.2f s %8d bytes\n' "$f" "$(soxi -D "$out/$f")" "$(stat -c %s "$out/$f")"
done
