#!/usr/bin/env bash
# Refresh the locks in requirements/ from pyproject.toml (and requirements/tools.in):
#   test.lock     runtime + test dependencies: what scripts/setup.sh (and so CI) installs
#   runtime.lock  the runtime dependencies only, at the same versions: what the image installs
# Every pin carries its sha256 hashes (pip's hash-checking mode). Run it after changing a
# dependency in pyproject.toml; `--upgrade` moves every pin to the newest allowed release
# (`--upgrade-package NAME` just one). Then run scripts/gen_protos.py if grpcio-tools moved,
# and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=.lock-venv
if [[ ! -x "$tools/bin/pip-compile" ]]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q 'pip-tools==7.7.0'
fi
# torch comes from pip's configured find-links (the CPU build, 2.13.0+cpu); the output
# names no index or link, so installs use the machine's pip configuration.
common=(--quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url
    --no-emit-find-links --resolver=backtracking "$@")
"$tools/bin/pip-compile" "${common[@]}" --extra test -o requirements/test.lock \
    pyproject.toml requirements/tools.in
"$tools/bin/pip-compile" "${common[@]}" -c requirements/test.lock -o requirements/runtime.lock \
    pyproject.toml
echo "requirements/test.lock and requirements/runtime.lock refreshed"
