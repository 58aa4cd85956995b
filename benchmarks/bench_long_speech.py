"""Time to first frame and peak memory against the speech length (tiny preset, `--num_clip 1`).

Writes speech of 1, 10 and 30 minutes (or `--minutes`), runs `liveavatar generate --preset tiny
--num_clip 1` on each in a fresh process and prints the time to the first frame and the peak
resident memory, with ratios against the shortest:

    python benchmarks/bench_long_speech.py --minutes 1,10,30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
from test_long_speech import generate, write_speech  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", default="1,10,30")
    args = ap.parse_args()
    minutes = [float(m) for m in args.minutes.split(",")]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        image = d / "face.png"
        Image.fromarray((np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)).save(image)
        rows = []
        for m in minutes:
            write_speech(d / f"{m:g}.wav", m)
            first, rss = generate(image, d / f"{m:g}.wav", d / f"{m:g}.mp4")
            rows.append((m, first, rss / 1024))
    base = rows[0]
    print(f"{'speech':>8} {'first frame s':>14} {'vs first':>9} {'peak RSS MiB':>13} {'vs first':>9}")
    for m, first, rss in rows:
        print(f"{m:6g} min {first:14.2f} {first / base[1]:9.3f} {rss:13.0f} {rss / base[2]:9.3f}")


if __name__ == "__main__":
    main()
