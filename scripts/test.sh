#!/usr/bin/env bash
# Set up (CPU torch pinned, the package with its dev extras) and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
# The page test drives headless Chromium; install it where we can (it is skipped without one).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 &&
        apt-get install -y -qq chromium >/dev/null 2>&1; }) || echo "note: chromium not installed; the page test is skipped"
fi
python3 -m ruff check liveavatar tests benchmarks scripts examples
python3 -m pytest tests -p no:cacheprovider --durations=25
