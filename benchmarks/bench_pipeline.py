"""The timestep pipeline on CPU processes (gloo, tiny preset) against the single-process run.

For each layout, runs a generation of `--blocks` blocks in fresh processes (one thread each, as
torchrun gives them) and prints, per rank: the time it computes per block, the time it waits for
each block's message, its wait and its re-prefill at the sink refresh, and the bytes it sends per
block; then the steady-state throughput (blocks after the first 4, at the decoder) against the
single-process run in this same invocation:

    python benchmarks/bench_pipeline.py --blocks 16 --layouts "2,2+d,4+d,u2"

On a 2-core machine the ranks share the cores, so throughput cannot scale here; what this measures
is where each rank's time goes, that the sink refresh costs no idle time, and the bytes on the wire.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dist"))
from ranks import run_ranks  # noqa: E402

from liveavatar import GenerationOptions, Pipeline  # noqa: E402
from liveavatar.distributed.layout import ParallelLayout  # noqa: E402

PROMPT = "a person talking"


def parse_layout(spec: str) -> ParallelLayout:
    """"4+d": 4 denoise ranks and a decode rank; "u2": 2 Ulysses ranks; "u2s": with sharded weights."""
    decode = spec.endswith("+d")
    spec = spec.removesuffix("+d")
    if spec.startswith("u"):
        shard = spec.endswith("s")
        u = int(spec.removeprefix("u").removesuffix("s"))
        return ParallelLayout(u, ulysses=u, shard_weights=shard, decode_rank=decode)
    return ParallelLayout(int(spec), decode_rank=decode)


def rank_main(rank, world, layout, files, opts):
    from liveavatar.distributed.generate import RankJob, run_rank

    times = []

    def build(role, place_dit):
        return Pipeline.tiny(seed=0, place_dit=place_dit)

    job = RankJob(layout, rank, opts, files[0], files[1], PROMPT, build)
    stats, _ = run_rank(job, lambda h, w: (lambda chunk: times.append(time.perf_counter())))
    return {"stats": stats.__dict__, "emitted": times, "role": layout.role(rank).describe()}


def steady(times: list[float], skip: int = 4) -> float:
    """Blocks per second between the (skip+1)-th and the last block."""
    t = times[skip:]
    return (len(t) - 1) / (t[-1] - t[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--layouts", default="2,2+d,4+d,u2")
    args = ap.parse_args()
    opts = GenerationOptions(size=128 * 128, num_clip=(args.blocks + 3) // 4, seed=3)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        Image.fromarray((np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)).save(d / "face.png")
        t = np.arange(int(16000 * 0.48 * args.blocks)) / 16000
        sf.write(d / "speech.wav", (0.3 * np.sin(2 * np.pi * 170 * t)).astype(np.float32), 16000)
        files = (str(d / "face.png"), str(d / "speech.wav"))

        torch.set_num_threads(1)
        session = Pipeline.tiny(seed=0).session(*files, PROMPT, opts)
        single = []
        for _ in session:
            single.append(time.perf_counter())
        base = steady(single)
        print(f"single process: {len(single)} blocks, steady {base:.2f} blocks/s (1 thread)\n")

        for spec in args.layouts.split(","):
            layout = parse_layout(spec).check(4)
            results = run_ranks(rank_main, layout.world, layout, files, opts, timeout=1800)
            out = results[layout.decoder]["emitted"]
            rate = steady(out)
            print(f"layout {spec}: {len(out)} blocks, steady {rate:.2f} blocks/s = {rate / base:.2f}x single process")
            print(f"  {'rank':<42} {'compute ms/block':>16} {'wait ms/block':>13} {'refresh wait ms':>15} "
                  f"{'re-prefill ms':>13} {'KB sent/block':>13}")
            for r in results:
                s = r["stats"]
                busy, wait = np.mean(s["busy"][4:]) * 1e3, np.mean(s["waiting"][4:]) * 1e3
                sent = s["bytes_sent"] / max(1, s["blocks"]) / 1024
                print(f"  {r['role']:<42} {busy:16.1f} {wait:13.1f} {s['refresh_wait'] * 1e3:15.1f} "
                      f"{s['refresh_compute'] * 1e3:13.1f} {sent:13.1f}")
            print()


if __name__ == "__main__":
    main()
