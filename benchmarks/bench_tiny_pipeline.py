"""Where the time goes in one streaming generation: encoders, DiT and VAE, side by side.

Runs the built-in tiny model (or any pipeline the engine can build) on the bundled example face and
speech and prints seconds and frames/s per stage, with each stage's share of the total:

    python benchmarks/bench_tiny_pipeline.py --size 256*256
"""

from __future__ import annotations

import argparse
import time

import torch

from liveavatar import GenerationOptions, Inputs, Pipeline
from liveavatar.engine.decode import DecodeStage
from liveavatar.io import media
from liveavatar.models.t5 import encode_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256*256")
    ap.add_argument("--num_clip", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t = {}
    t0 = time.perf_counter()
    pipe = Pipeline.tiny()
    t["build tiny models"] = time.perf_counter() - t0
    opts = GenerationOptions(size=media.parse_size(args.size), num_clip=args.num_clip)
    inputs = Inputs.load(str(media.example_image_path()), str(media.example_audio_path()), opts)

    with torch.no_grad():
        t0 = time.perf_counter()
        ctx = encode_text(pipe.text_encoder, pipe.tokenizer, "a person talking")
        t["encode: text (T5)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.audio_encoder.features(media.load_audio(media.example_audio_path()), 48)
        t["encode: audio (wav2vec2, one pass)"] = time.perf_counter() - t0
        del ctx

        t0 = time.perf_counter()
        session = pipe.session(inputs, prompt="a person talking", options=opts)
        t["encode: session setup (text, VAE encode of the motion frames, sink prefill)"] = time.perf_counter() - t0

        dit_time = 0.0
        latents = []
        gen = session.latents()
        while True:
            t0 = time.perf_counter()
            z = next(gen, None)
            dit_time += time.perf_counter() - t0
            if z is None:
                break
            latents.append(z)
        t["DiT: 4 steps per block (+ audio features, sink refresh)"] = dit_time

        decode = DecodeStage(pipe.vae, pipe.device)
        t0 = time.perf_counter()
        decode.start(session.cond.motion_latents)
        for z in latents:
            decode(z)
        t["VAE: streaming decode (warm-up + blocks)"] = time.perf_counter() - t0

    frames = session.num_frames
    gen_total = sum(v for k, v in t.items() if k.startswith(("encode: session", "DiT", "VAE")))
    print(f"tiny pipeline at {session.width}x{session.height}, {frames} frames, {session.num_blocks} blocks, "
          f"{torch.get_num_threads()} threads")
    print(f"{'stage':<70} {'seconds':>8} {'frames/s':>9} {'share':>6}")
    for k, v in t.items():
        fps = f"{frames / v:9.2f}" if not k.startswith(("build", "encode: text", "encode: audio")) else " " * 9
        share = f"{100 * v / gen_total:5.1f}%" if k.startswith(("encode: session", "DiT", "VAE")) else ""
        print(f"{k:<70} {v:8.2f} {fps} {share:>6}")
    print(f"{'generation total (setup + DiT + VAE)':<70} {gen_total:8.2f} {frames / gen_total:9.2f}")


if __name__ == "__main__":
    main()
