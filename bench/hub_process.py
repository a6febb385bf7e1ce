"""Child process for the benches (``python -m bench.hub_process``): the loopback hub (tests.hubserver) serving tiny.en.

Prints one JSON line ``{"endpoint": ...}`` once serving, then serves until stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench import benchlib
from tests.hubserver import HubServer
from tests.support import tiny_en_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo-id", default=benchlib.TINY_REPO)
    parser.add_argument("--throttle", type=int, default=0, help="bytes per second for file bodies (0 = unthrottled)")
    parser.add_argument(
        "--nagle", action="store_true", help="leave Nagle's algorithm on (40 ms stalls on small answers)"
    )
    args = parser.parse_args()
    benchlib.configure_hub_sockets(nodelay=not args.nagle)
    hub = HubServer()
    hub.start()
    hub.add_repo(args.repo_id, tiny_en_files())
    if args.throttle:
        hub.throttle(args.throttle)
    print(json.dumps({"endpoint": hub.endpoint}), flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
