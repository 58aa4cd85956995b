"""Windowed against one-pass wav2vec2 encoding: how far the features and the tiny DiT's velocity move.

For a speech of `--seconds` (the bundled example speech repeated with varying loudness), computes the
per-frame audio features with the official one-pass encoding and with windowed encodings of several
geometries (window, left context, look-ahead in seconds), then the velocity of the first denoising
step of every block of the tiny DiT fed either. The two differ in two ways, measured apart: the
resampling (one-pass stretches the 30 Hz grid over the utterance's length, windowed uses the fixed
rate 50/30 that a stream of unknown length needs: "fixed-rate" is one window over the whole speech,
so it isolates that), and the windowing itself (context and per-window normalisation: windowed
against fixed-rate). Prints relative L2 differences of features and velocities, the worst frame or
block, the encoder time and the first-frame look-ahead:

    python benchmarks/bench_audio_windows.py --seconds 30 --windows 1,5,1 0.5,2,0.5 2,8,2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from liveavatar import GenerationOptions, Pipeline
from liveavatar.engine.audio_features import AudioFeatures, AudioWindows
from liveavatar.engine.denoise import DenoiseStage
from liveavatar.engine.speech import SpeechStream
from liveavatar.io import media


def speech(seconds: float) -> np.ndarray:
    base = media.load_audio(media.example_audio_path())
    reps = int(np.ceil(seconds * 16000 / len(base)))
    gains = 0.6 + 0.4 * np.abs(np.sin(np.arange(reps)))  # loudness changes between repetitions
    return np.concatenate([g * base for g in gains])[: int(seconds * 16000)].astype(np.float32)


def features(pipe, wave: np.ndarray, frames: int, mode: str, windows=None) -> tuple[torch.Tensor, float]:
    stream = SpeechStream()
    stream.push(wave)
    stream.end()
    f = AudioFeatures(pipe.audio_encoder, stream, fps=25, dtype=torch.float32, mode=mode, windows=windows)
    t0 = time.perf_counter()
    out = f.frames(0, frames)
    return out, time.perf_counter() - t0


def velocities(pipe, session, feats: torch.Tensor, blocks: int) -> torch.Tensor:
    """First-step velocity of each block, through a one-step denoise stage fed `feats`."""
    stage = DenoiseStage(pipe.dit, session.schedule, [0], session.layout, "cpu", pipe.dtype)
    stage.start(session.cond.text, session.cond.ref_latent, session.cond.motion_latents)
    out = []
    for n in range(blocks):
        task = session.frontend.plan.task(n, feats[..., 12 * n: 12 * (n + 1)])
        z = stage(task)
        dt = session.schedule.sigmas[1] - session.schedule.sigmas[0]
        out.append((z.float() - task.noise.float()) / dt)
    return torch.stack(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--windows", nargs="+", default=["1,5,1", "0.5,2,0.5", "1,2,0.5", "2,8,2", "1,10,2"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = Pipeline.tiny(seed=0)
    wave = speech(args.seconds)
    frames = int(args.seconds * 25) // 12 * 12
    blocks = frames // 12
    ref, t_ref = features(pipe, wave, frames, "one-pass")
    fixed, _ = features(pipe, wave, frames, "windowed", AudioWindows(2 * args.seconds, 0.0, 0.0))
    session = pipe.session(str(media.example_image_path()), wave, "a person talking",
                           GenerationOptions(size=128 * 128, seed=1))
    v_ref, v_fixed = velocities(pipe, session, ref, blocks), velocities(pipe, session, fixed, blocks)
    print(f"{args.seconds:g} s of speech, {frames} frames, {blocks} blocks; one-pass encoder {t_ref:.2f} s")
    print("relative L2 difference (worst frame / block in brackets)")
    print(f"{'window,left,right s':>20} {'features vs one-pass':>22} {'vs fixed-rate':>16} "
          f"{'velocity vs one-pass':>22} {'vs fixed-rate':>16} {'encoder x':>10} {'look-ahead s':>13}")

    def row(name, feats, t, lookahead):
        def both(a, b, dims):
            per = (a - b).flatten(0, dims).norm(dim=0) / b.flatten(0, dims).norm(dim=0).clamp_min(1e-12)
            return f"{rel(a, b):.4f} ({per.max().item():.3f})"
        v = velocities(pipe, session, feats, blocks)
        vb = lambda a, b: f"{rel(a, b):.4f} ({max(rel(a[i], b[i]) for i in range(blocks)):.3f})"  # noqa: E731
        print(f"{name:>20} {both(feats, ref, 2):>22} {both(feats, fixed, 2):>16} {vb(v, v_ref):>22} "
              f"{vb(v, v_fixed):>16} {t / t_ref:10.2f} {lookahead:>13}")

    row("fixed-rate", fixed, t_ref, "all")
    for spec in args.windows:
        w = AudioWindows(*(float(x) for x in spec.split(",")))
        feats, t = features(pipe, wave, frames, "windowed", w)
        row(spec, feats, t, f"{w.window + w.right:.2f}")


if __name__ == "__main__":
    main()
