#!/usr/bin/env bash
# Set up (CPU torch pinned, the package with its dev extras) and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
python3 -m ruff check liveavatar tests benchmarks scripts examples
python3 -m pytest tests -p no:cacheprovider
