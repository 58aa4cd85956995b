"""Everything a first GPU run must check and measure, in one call, each part isolated and timed out.

    python benchmarks/gpu_all.py                          # tests/gpu, then the full-size benchmarks
    python benchmarks/gpu_all.py --dry-run                # what would run, nothing started
    python benchmarks/gpu_all.py --device cpu --preset tiny --skip-tests   # the same code on the CPU

Parts, each in its own process with a timeout, skipped (and said so) when the overall budget
(`--budget`, seconds) would be exceeded:
1. `python -m pytest tests/gpu` (every CUDA-only path against the CPU / eager result);
2. one generation per configuration at `--size` (default 704x384) on random full-size weights
   (speed and memory do not depend on weight values), with the planner's runtime layout for this GPU
   otherwise: `bf16-eager`, `bf16-compiled`, `fp8-compiled` (blocks compiled with the engine's
   `apply_compile` when it exists, else `torch.compile` per block). Each reports: seconds to the first
   frame, steady seconds per block and frames/s, DiT forward seconds (CUDA events) and the TFLOP/s and
   fraction of the GPU's dense bf16 peak they reach for the counted 123 TFLOP a forward, the speed
   model's forecast for the same forward, and `max_memory_reserved` / `max_memory_allocated` against
   the planner's peak.
The summary is printed and written as JSON and Markdown (`--out`, default
benchmarks/results/gpu_all-<time>.{json,md}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("bf16-eager", "bf16-compiled", "fp8-compiled")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="s2v-14b")
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--num_clip", type=int, default=2, help="clips per run (4 blocks each)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--budget", type=float, default=560.0, help="seconds for everything")
    ap.add_argument("--tests_timeout", type=float, default=240.0)
    ap.add_argument("--run_timeout", type=float, default=200.0)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for c in args.configs.split(","):
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r}; use {', '.join(CONFIGS)}")
    return args


# ---- one configuration, in a child process ---------------------------------------------------


def _random_module(module_cls, cfg, device, dtype, gen_seed: int):
    """`module_cls(cfg)` with seeded random weights drawn on `device` (seconds for 14B parameters on a GPU)."""
    import torch

    from liveavatar.engine.pipeline import random_module

    return random_module(module_cls, cfg, dtype, device, torch.Generator(device=device).manual_seed(gen_seed),
                         in_place=True)


def _compile(dit) -> str:
    try:
        from liveavatar.runtime.compile import apply_compile

        apply_compile(dit)
        return "apply_compile"
    except ImportError:
        for block in dit.blocks:
            block.compile()
        return "torch.compile per block"


def run_config(args) -> dict:
    import torch

    from liveavatar import GenerationOptions
    from liveavatar.config import get_preset
    from liveavatar.engine.pipeline import Pipeline
    from liveavatar.io import media
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.models.t5 import T5Encoder, TextTokenizer
    from liveavatar.models.vae import WanVAE
    from liveavatar.models.wav2vec2 import AudioEncoder
    from liveavatar.runtime import gpus
    from liveavatar.runtime.fp8 import apply_fp8
    from liveavatar.runtime.memory import GiB, RuntimeConfig, plan, predict
    from liveavatar.runtime.speed import forward_seconds, forward_work

    name = args.child
    cuda = args.device.startswith("cuda")
    preset = get_preset(args.preset)
    dtype = torch.bfloat16 if cuda else torch.float32
    fp8 = name.startswith("fp8")
    inputs_opts = GenerationOptions(size=media.parse_size(args.size), num_clip=args.num_clip, seed=0)
    from liveavatar.engine.session import Inputs

    inputs = Inputs.load(str(media.example_image_path()), str(media.example_audio_path()), inputs_opts)
    h, w = inputs.height, inputs.width
    spec = gpus.from_device() if cuda else gpus.default_gpu(80)
    best = plan(preset, spec, h, w, allow_fp8=fp8)  # the planner's layout, FP8 as the configuration says
    runtime = dataclasses.replace(best.config if best.fits else RuntimeConfig(), fp8=fp8)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    enc_home = "cpu" if runtime.offload_model else args.device
    dit = _random_module(CausalS2VDiT, preset.dit, args.device, dtype, 1)
    vae = _random_module(WanVAE, preset.vae, args.device, dtype, 2)
    t5 = _random_module(T5Encoder, preset.t5, args.device, dtype, 3).to("cpu" if runtime.t5_cpu else enc_home)
    audio = AudioEncoder.random(preset.audio, seed=0, dtype=dtype).to(enc_home)
    tok = TextTokenizer.builtin(preset.t5.vocab_size, preset.t5.text_len)
    if runtime.fp8:
        apply_fp8(dit)  # quantised where it was made (the pipeline finds nothing left to quantise)
    if runtime.resident_blocks is not None:
        dit = dit.cpu()  # block streaming starts from a host copy, as from a checkpoint
    pipe = Pipeline(preset, dit, vae, t5, tok, audio, args.device, runtime)
    compiled = _compile(pipe.dit) if name.endswith("compiled") else "eager"
    build = time.perf_counter() - t0
    fwd_events = []
    real_forward = pipe.dit.forward

    def timed_forward(*a, **k):
        if not cuda:
            t = time.perf_counter()
            out = real_forward(*a, **k)
            fwd_events.append(time.perf_counter() - t)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = real_forward(*a, **k)
        end.record()
        fwd_events.append((start, end))
        return out

    pipe.dit.forward = timed_forward
    blocks, t_start = [], time.perf_counter()
    first = None
    with pipe.session(inputs, prompt="a person talking", options=inputs_opts) as session:
        t = time.perf_counter()
        for _ in session:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            first = first or now - t_start
            blocks.append(now - t)
            t = now
    if cuda:
        torch.cuda.synchronize()
    fwd = [e[0].elapsed_time(e[1]) / 1e3 for e in fwd_events] if cuda else fwd_events
    steps = preset.sampler.steps
    steady_fwd = fwd[2 * steps:] or fwd  # past the first two blocks (warm-up, compilation)
    steady_blocks = blocks[2:] or blocks
    work = forward_work(preset, h, w)
    fwd_s = sorted(steady_fwd)[len(steady_fwd) // 2]
    model = forward_seconds(work, spec, runtime.fp8, runtime.kv_fp8)
    planned = predict(preset, runtime, spec, h, w).gpus[0].peak_bytes
    return {
        "config": name, "flags": " ".join(runtime.flags()), "compile": compiled, "gpu": spec.describe(),
        "size": f"{h}x{w}", "build_s": round(build, 1), "first_frame_s": round(first or -1, 2),
        "blocks": len(blocks), "s_per_block": round(sum(steady_blocks) / len(steady_blocks), 3),
        "frames_per_s": round(12 * len(steady_blocks) / sum(steady_blocks), 2),
        "forward_s_median": round(fwd_s, 4), "forward_tflop": round(work.flops / 1e12, 2),
        "tflops_reached": round(work.flops / fwd_s / 1e12, 1),
        "fraction_of_bf16_peak": round(work.flops / fwd_s / (spec.tflops * 1e12), 3),
        "model_forward_s": round(model["total"], 4), "model_over_measured": round(model["total"] / fwd_s, 2),
        "planned_peak_gib": round(planned / GiB, 2),
        "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
        "max_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
    }


# ---- the orchestrator ----------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=os.environ | {"PYTHONPATH": str(ROOT)})
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out, time.perf_counter() - t


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_config(args)), flush=True)
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_all-{stamp}.json"
    plan_steps = [] if args.skip_tests else [("tests/gpu", [sys.executable, "-m", "pytest", "tests/gpu", "-q",
                                                             "-p", "no:cacheprovider"], args.tests_timeout)]
    for c in args.configs.split(","):
        plan_steps.append((c, [sys.executable, str(Path(__file__).resolve()), "--child", c, "--device", args.device,
                               "--preset", args.preset, "--size", args.size, "--num_clip", str(args.num_clip)],
                           args.run_timeout))
    if args.dry_run:
        for name, cmd, timeout in plan_steps:
            print(f"{name}: timeout {timeout:.0f} s: {' '.join(cmd)}")
        print(f"budget {args.budget:.0f} s; results to {out} and {out.with_suffix('.md')}")
        return 0
    deadline = time.perf_counter() + args.budget
    results = []
    for name, cmd, timeout in plan_steps:
        left = deadline - time.perf_counter()
        if left < 30:
            results.append({"part": name, "status": "skipped: out of time"})
            continue
        rc, text, secs = _run(cmd, min(timeout, left))
        status = "timed out" if rc is None else ("ok" if rc == 0 else f"failed (exit {rc})")
        entry = {"part": name, "status": status, "seconds": round(secs, 1), "tail": text[-3000:]}
        for line in text.splitlines():
            if line.startswith("RESULT "):
                entry |= json.loads(line[7:])
        results.append(entry)
        print(f"[{name}] {status} in {secs:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"time": stamp, "args": vars(args), "results": results}, indent=2))
    md = summary(results)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"written: {out} and {out.with_suffix('.md')}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def summary(results: list[dict]) -> str:
    lines = ["| part | status | s | frames/s | s/block | first frame s | forward s | TFLOP/s | of bf16 peak | "
             "model/measured | reserved GiB | allocated GiB | planned GiB |", "|---" * 13 + "|"]
    for r in results:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in (
            "part", "status", "seconds", "frames_per_s", "s_per_block", "first_frame_s", "forward_s_median",
            "tflops_reached", "fraction_of_bf16_peak", "model_over_measured", "max_reserved_gib",
            "max_allocated_gib", "planned_peak_gib")) + " |")
    for r in results:
        if r["status"] != "ok" and r.get("tail"):
            lines += ["", f"### {r['part']}: {r['status']}", "```", r["tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
