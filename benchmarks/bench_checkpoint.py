"""What resumable renders cost: checkpoint size and write time, and the run-time overhead of saving.

Measured on the tiny preset (one loaded model, the same job rendered without checkpoints, with the
default automatic interval and after every block, side by side with ratios against no checkpoints),
then computed for the real model at 704x384 from the cache shapes the planner uses (bf16 caches, and
with the ring caches in FP8 as `--kv_fp8` keeps them), with the write time at a few disk speeds and
the automatic interval that follows from the planner's seconds-per-block estimates:

    python benchmarks/bench_checkpoint.py --size 128*128 --num_clip 2
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from liveavatar import GenerationOptions, Inputs, Pipeline
from liveavatar.engine.resume import OVERHEAD_BUDGET, JobIdentity, state_nbytes
from liveavatar.io import media
from liveavatar.render import Job, Render

GB = 1e9


def measure_tiny(size: str, num_clip: int, repeats: int, folder: Path) -> None:
    pipe = Pipeline.tiny()
    image, audio = str(media.example_image_path()), str(media.example_audio_path())
    opts = GenerationOptions(size=media.parse_size(size), num_clip=num_clip)
    inputs = Inputs.load(image, audio, opts)
    identity = JobIdentity.make(opts, "a person talking", image, audio, {"preset": "tiny"})
    modes = {"none": 0, "auto (default)": None, "every block": 1}
    runs: dict[str, list[Render]] = {m: [] for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode, every in modes.items():  # interleaved: machine noise spreads over all modes
            out = folder / f"{r}-{mode.split()[0]}.mp4"
            job = Job(image, audio, "a person talking", opts, inputs, str(out), identity, checkpoint_every=every)
            t = time.perf_counter()
            render = Render(pipe, job)
            render.run()
            times[mode].append(time.perf_counter() - t)
            runs[mode].append(render)
    base = min(times["none"])
    session = pipe.session(inputs, prompt="a person talking", options=opts)
    next(iter(session))
    state = session.state_dict()
    parts = {"ring caches": [s["rings"] for s in state["denoise"]], "sink": [s["sink"] for s in state["denoise"]],
             "VAE decoder state": state["decode"], "conditioning": state["conditioning"],
             "speech + audio features": state["frontend"]}
    session.close()
    print(f"tiny preset, {inputs.width}x{inputs.height}, {runs['none'][0].blocks} blocks, best of {repeats} "
          f"(model loaded once; each run: session setup + blocks + MP4)")
    print(f"{'checkpoints':<16} {'run s':>8} {'vs none':>8} {'saves':>6} {'state MiB':>10} {'s per save':>11} "
          f"{'saving share':>13}")
    for mode in modes:
        best = min(range(repeats), key=lambda i: times[mode][i])
        r = runs[mode][best]
        c = r.checkpoints
        per = c.seconds / c.count if c.count else 0.0
        print(f"{mode:<16} {times[mode][best]:>8.2f} {times[mode][best] / base:>8.3f} {c.count:>6} "
              f"{c.bytes / 2**20:>10.2f} {per:>11.4f} {100 * c.seconds / times[mode][best]:>12.2f}%")
    print("where the bytes of a tiny state go: " + ", ".join(f"{k} {state_nbytes(v) / 2**20:.2f} MiB"
                                                             for k, v in parts.items()))


def disk_write_rate(folder: Path, nbytes: int = 512 * 2**20) -> float:
    """Bytes per second of a large write + fsync to `folder` (the disk the states would go to)."""
    block = os.urandom(1 << 24)
    fd, path = tempfile.mkstemp(dir=folder)
    try:
        t = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - t)
    finally:
        os.unlink(path)


def full_size(height: int, width: int, seconds_speech: float, local_rate: float) -> None:
    from liveavatar.config import S2V_14B
    from liveavatar.models.layout import SinkLayout
    from liveavatar.models.vae import stream_state_nbytes
    from liveavatar.runtime.gpus import gpu_named
    from liveavatar.runtime.kv_cache import FP8RingKVCache, RingKVCache, SinkCache
    from liveavatar.runtime.memory import RuntimeConfig, seconds_per_block

    p, bf16 = S2V_14B, torch.bfloat16
    layout = SinkLayout(height // 8, width // 8, p.dit.zip_frame_buckets)
    steps = p.sampler.steps
    lat = p.dit.in_dim * (height // 8) * (width // 8) * 2
    parts = {
        "ring caches (4 steps)": steps * RingKVCache.bytes_for(p.dit, layout.fs, bf16),
        "sink cache": SinkCache.bytes_for(p.dit, layout, bf16),
        "VAE decoder state": stream_state_nbytes(p.vae, height // 8, width // 8, bf16),
        "conditioning (text 512 tokens, ref + 19 motion latents)": p.t5.text_len * p.dit.text_dim * 2 + 20 * lat,
        f"audio features (one-pass, {seconds_speech:.0f} s)": (p.audio.num_hidden_layers + 1) * p.audio.hidden_size
        * p.audio.interp_rate * int(seconds_speech) * 2,
    }
    total = sum(parts.values())
    fp8_rings = steps * FP8RingKVCache.bytes_for(p.dit, layout.fs)
    total_fp8 = total - parts["ring caches (4 steps)"] + fp8_rings
    print(f"\ns2v-14b at {height}x{width} (HxW), computed from the cache shapes:")
    for k, v in parts.items():
        print(f"  {k:<58} {v / 2**30:>8.2f} GiB")
    print(f"  {'state file (bf16 caches)':<58} {total / 2**30:>8.2f} GiB")
    print(f"  {'state file with FP8 ring caches (--kv_fp8 runs)':<58} {total_fp8 / 2**30:>8.2f} GiB")
    rates = {"this machine's disk": local_rate, "1 GB/s": 1 * GB, "2 GB/s (NVMe)": 2 * GB, "5 GB/s (RAID)": 5 * GB}
    gpus = {"H100 SXM": gpu_named("h100-sxm"), "RTX 4090 (24 GB)": gpu_named("rtx4090")}
    blocks = {name: seconds_per_block(p, RuntimeConfig(), gpu, height, width) for name, gpu in gpus.items()}
    print(f"\n{'disk':<22} {'write s (bf16)':>15} {'write s (fp8)':>14}   auto interval at {OVERHEAD_BUDGET:.0%} "
          "(blocks, minutes of generation) with the planner's s/block estimate")
    for name, rate in rates.items():
        w, w8 = total / rate, total_fp8 / rate
        cols = []
        for g, s in blocks.items():
            n = math.ceil(w / (OVERHEAD_BUDGET * s))
            cols.append(f"{g} ({s:.2f} s/block): every {n} blocks = {n * s / 60:.1f} min")
        print(f"{name + f' {rate / GB:.2f} GB/s' if name.startswith('this') else name:<22} {w:>15.1f} {w8:>14.1f}   "
              + "; ".join(cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="128*128")
    ap.add_argument("--num_clip", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds_speech", type=float, default=60.0, help="speech length for the one-pass features")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=".") as d:
        measure_tiny(args.size, args.num_clip, args.repeats, Path(d))
        rate = disk_write_rate(Path(d))
    full_size(704, 384, args.seconds_speech, rate)


if __name__ == "__main__":
    main()
