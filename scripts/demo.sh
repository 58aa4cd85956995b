#!/usr/bin/env bash
# Set up (CPU torch pinned, the package) and run the built-in tiny model on the bundled example face
# and speech. Writes output/demo.mp4. Extra arguments are passed to `liveavatar generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e .
liveavatar generate --preset tiny --size 256*256 --save_file output/demo.mp4 "$@"
