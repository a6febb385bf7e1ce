"""Benchmarks, run from the repo root as modules: ``.venv/bin/python -m bench.bench_pull``.

huggingface_hub reads these settings when it is imported; the package runs before any bench module.
"""

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("HF_HUB_OFFLINE", None)
