"""Planned vs measured GPU memory, and speed, for the runtime modes (full size, random weights).

For each configuration it builds the whole pipeline with random weights (speed and memory do not
depend on weight values), generates a few blocks on the bundled example face and speech, and prints
`torch.cuda.max_memory_allocated()` next to `liveavatar plan`'s predicted peak, and seconds per block
next to the resident baseline measured in the same run:

    python benchmarks/bench_memory.py --size 704*384 --num_clip 1
    python benchmarks/bench_memory.py --configs resident,stream24 --num_clip 2

Configurations: `resident` (bf16, everything on the GPU), `stream24` (the fastest bf16 layout that
`plan --auto --no_fp8` picks for 24 GB, run under a 24 GB allocator cap), `fp8` (FP8 weights,
resident), `auto24` (whatever `plan --auto` picks for 24 GB). Needs CUDA; `--preset tiny --device cpu`
runs the same code on the CPU as a smoke test (no memory figures).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from liveavatar import GenerationOptions, Pipeline
from liveavatar.config import get_preset
from liveavatar.io import media
from liveavatar.runtime.gpus import default_gpu, from_device
from liveavatar.runtime.memory import GiB, RuntimeConfig, plan, predict


def runtime_for(name: str, preset, height: int, width: int) -> tuple[RuntimeConfig, float | None]:
    """(runtime config, GiB cap) of a named configuration."""
    if name == "resident":
        return RuntimeConfig(), None
    if name == "fp8":
        return RuntimeConfig(fp8=True), None
    if name in ("stream24", "auto24"):
        gpu = from_device().with_memory(24) if torch.cuda.is_available() else default_gpu(24)
        p = plan(preset, gpu, height, width, allow_fp8=name == "auto24")
        return p.config, 24.0
    raise SystemExit(f"unknown configuration {name!r}; use resident, stream24, fp8 or auto24")


def run(name: str, args, preset, inputs, opts) -> dict:
    runtime, cap = runtime_for(name, preset, inputs.height, inputs.width)
    cuda = args.device.startswith("cuda")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (cap * GiB if cap else total) / total))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe = Pipeline.random_weights(preset, args.device, runtime=runtime)
    build = time.perf_counter() - t0
    session = pipe.session(inputs, prompt="a person talking", options=opts)
    times = []
    t = time.perf_counter()
    for _ in session:
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - t)
        t = now
    steady = times[1:] or times  # the first block includes the sink prefill and warm-up
    gpu = from_device() if cuda else default_gpu(80)
    gpu = gpu.with_memory(cap) if cap else gpu
    planned = predict(preset, runtime, gpu, inputs.height, inputs.width, opts.infer_frames).gpus[0].peak_bytes
    measured = torch.cuda.max_memory_allocated() if cuda else None
    del session, pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"name": name, "flags": " ".join(runtime.flags()), "cap": cap, "build_s": build,
            "s_per_block": sum(steady) / len(steady), "planned": planned, "measured": measured}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="s2v-14b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--num_clip", type=int, default=1)
    ap.add_argument("--configs", default="resident,stream24,fp8")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; run with --preset tiny --device cpu for a smoke test")
    preset = get_preset(args.preset)
    opts = GenerationOptions(size=media.parse_size(args.size), num_clip=args.num_clip)
    from liveavatar import Inputs

    inputs = Inputs.load(str(media.example_image_path()), str(media.example_audio_path()), opts)
    rows = [run(name, args, preset, inputs, opts) for name in args.configs.split(",")]
    base = next((r for r in rows if r["name"] == "resident"), rows[0])
    print(f"\n{args.preset} at {inputs.height}x{inputs.width} (HxW), {args.num_clip} clip(s), device {args.device}")
    print(f"{'config':<10} {'cap GiB':>7} {'planned GiB':>11} {'measured GiB':>12} {'meas/plan':>9} "
          f"{'s/block':>8} {'vs resident':>11}  flags")
    for r in rows:
        meas = f"{r['measured'] / GiB:12.2f}" if r["measured"] is not None else f"{'-':>12}"
        ratio = f"{r['measured'] / r['planned']:9.3f}" if r["measured"] is not None else f"{'-':>9}"
        cap = f"{r['cap']:7.0f}" if r["cap"] else f"{'-':>7}"
        print(f"{r['name']:<10} {cap} {r['planned'] / GiB:11.2f} {meas} {ratio} {r['s_per_block']:8.3f} "
              f"{r['s_per_block'] / base['s_per_block']:11.3f}  {r['flags']}")


if __name__ == "__main__":
    main()
