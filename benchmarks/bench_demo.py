"""The README demo's wall time at an earlier revision and at this one, side by side.

    python benchmarks/bench_demo.py --base 2b0d56a^ [--runs 2] [--size 256*256]

Each revision runs `liveavatar generate --preset tiny --size 256*256` (the README demo) from a
checkout of that revision (a temporary `git worktree`), alternating between them so that both see
the same machine load; the best time of each is compared. The two videos are also compared frame by
frame (the revisions compute the same model; differences are float rounding).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, size: str, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "liveavatar", "generate", "--preset", "tiny", "--size", size,
                           "--save_file", str(out), "--overwrite"], cwd=tree, env=env, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: the demo failed at {tree}: {proc.stderr.strip()[-500:]}")
    return elapsed


def frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the earlier revision (any git revision)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--size", default="256*256")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base_tree = Path(d) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       check=True)
        try:
            times: dict[str, list[float]] = {"base": [], "head": []}
            for _ in range(args.runs):
                times["base"].append(run(base_tree, args.size, Path(d) / "base.mp4"))
                times["head"].append(run(ROOT, args.size, Path(d) / "head.mp4"))
            fb, fh = frames(Path(d) / "base.mp4"), frames(Path(d) / "head.mp4")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True,
                         text=True).stdout.strip()
    b, h = min(times["base"]), min(times["head"])
    print(f"README demo (tiny, {args.size}), wall seconds, best of {args.runs}:")
    print(f"  {args.base} ({rev}): {b:7.1f}   {[round(t, 1) for t in times['base']]}")
    print(f"  this revision:       {h:7.1f}   {[round(t, 1) for t in times['head']]}")
    print(f"  speed-up: {b / h:.2f}x")
    same = fb.shape == fh.shape
    diff = np.abs(fb.astype(int) - fh.astype(int)) if same else None
    print(f"  videos: {len(fb)} vs {len(fh)} frames" + (f", mean |diff| {diff.mean():.3f}, max {diff.max()}"
                                                     if same else " (different lengths)"))


if __name__ == "__main__":
    main()
