"""Benchmark: one DiT block forward with every weight resident vs with block streaming.

Builds the full-size causal S2V DiT (or `--layers N` of its blocks, or the `--tiny` preset) with
random weights, prefills the sink, then times the streaming block forward (3 latent frames against
a full 12-frame ring + sink; 704x384 -> latent 88x48 by default) first with the whole model on the
device, then after `apply_block_streaming` under a `--budget-gb` weight cap (K resident groups chosen
by `choose_resident_blocks`, or `--resident K`). Prints ms per forward, the streaming/resident
ratio, `torch.cuda.max_memory_allocated` of each run, the bytes streamed per forward and the
velocity difference between the two runs (0 up to kernel nondeterminism).

    python benchmarks/bench_offload.py --budget-gb 20            # bf16, H100-class GPU
    python benchmarks/bench_offload.py --fp8 --budget-gb 10
    python benchmarks/bench_offload.py --layers 8 --budget-gb 4  # reduced depth
    python benchmarks/bench_offload.py --tiny                    # CPU smoke run

Needs CUDA except with `--tiny`; without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liveavatar.config import S2V_14B, TINY  # noqa: E402
from liveavatar.engine.denoise import block_attention, sink_prefill  # noqa: E402
from liveavatar.models.dit import CausalS2VDiT  # noqa: E402
from liveavatar.runtime.fp8 import apply_fp8  # noqa: E402
from liveavatar.runtime.kv_cache import RingKVCache, SinkCache, SinkLayout  # noqa: E402
from liveavatar.runtime.offload import apply_block_streaming, base_nbytes, choose_resident_blocks, group_nbytes  # noqa: E402

GB = 1e9


def fmt(nbytes: float) -> str:
    """Bytes in GB, or MB below 1 GB (the tiny preset)."""
    if nbytes != nbytes:  # NaN: not measured (CPU)
        return "-"
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.2f} MB"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny preset (runs on CPU in seconds)")
    p.add_argument("--layers", type=int, default=None, help="use only the first N transformer blocks")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="device bytes (GB) allowed for the DiT weights under streaming; default: stream all blocks")
    p.add_argument("--resident", type=int, default=None, help="resident groups (overrides --budget-gb)")
    p.add_argument("--fp8", action="store_true", help="FP8 weights (apply_fp8, per-channel scales)")
    p.add_argument("--height", type=int, default=None, help="video height (default 704; tiny: 64)")
    p.add_argument("--width", type=int, default=None, help="video width (default 384; tiny: 64)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu for --tiny")
    p.add_argument("--skip-resident", action="store_true",
                   help="build the model in host memory and time only the streamed run (GPUs too small for it)")
    return p.parse_args(argv)


def build_model(cfg, dtype: torch.dtype, device: torch.device, fp8: bool) -> CausalS2VDiT:
    """Random weights, materialised directly on `device`: N(0, 0.02), norms at 1, layer mix at 0.5."""
    with torch.device("meta"):
        model = CausalS2VDiT(cfg).to(dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name == "casual_audio_encoder.weights":
                p.fill_(0.5)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.eval()
    return apply_fp8(model) if fp8 else model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_kv(model, text: torch.Tensor):
    """What the blocks take for the text: the per-layer K/V once per session for resident blocks, the
    embedded text for blocks whose weights arrive per forward (as the denoise stage does)."""
    streamed = any(block._forward_pre_hooks for block in model.blocks[1:])
    with torch.no_grad():
        return text if streamed else model.text_kv(text)


def time_forward(model, inputs, device, warmup: int, iters: int) -> tuple[float, torch.Tensor]:
    """Mean seconds of one steady-state block forward (frame 36: a full ring, a rolled sink), and its
    output."""
    z, t, audio, text, ring, sink = inputs
    cfg, frames = model.cfg, z.shape[2]
    kv = text_kv(model, text)
    with torch.no_grad():
        e = model.block_time(t, 1, frames)
        for i in range(warmup + iters):
            if i == warmup:
                sync(device)
                start = time.perf_counter()
            ctx = block_attention(cfg, ring, sink, 36, 6, frames, device)
            out = model(z, e, audio, kv, ctx)
        sync(device)
    return (time.perf_counter() - start) / iters, out


def prefill(model, ref, motion, text, sink, device) -> None:
    with torch.no_grad():
        model.prefill_sink(ref, motion, text_kv(model, text), sink_prefill(model.cfg, sink, device))


def peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> float:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device is not None:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.tiny:
        device = torch.device("cpu")
    else:
        print("bench_offload: CUDA is not available; run on a GPU machine, or use --tiny for a CPU smoke run.")
        return 0
    cfg = TINY.dit if args.tiny else S2V_14B.dit
    if args.layers is not None:
        cfg = replace(cfg, num_layers=args.layers,
                      audio_inject_layers=tuple(i for i in cfg.audio_inject_layers if i < args.layers))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    height = args.height or (64 if args.tiny else 704)
    width = args.width or (64 if args.tiny else 384)
    lat_h, lat_w = height // 8, width // 8

    build_on = torch.device("cpu") if args.skip_resident else device
    t0 = time.perf_counter()
    model = build_model(cfg, dtype, build_on, args.fp8)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    print(f"model: {cfg.num_layers} blocks, {'fp8' if args.fp8 else str(dtype).removeprefix('torch.')} weights "
          f"{fmt(weights)}, built in {time.perf_counter() - t0:.1f} s on {build_on}")

    # Inputs and caches: a full ring (frame_start 36 > ring), re-roped sink.
    g = torch.Generator().manual_seed(1)
    layout = SinkLayout(lat_h, lat_w)
    sink = SinkCache.allocate(cfg, layout, dtype, device)
    ring = RingKVCache.allocate(cfg, layout.fs, dtype, device, sink_tokens=layout.num_tokens)
    print(f"latent {lat_h}x{lat_w}: {3 * layout.fs} query tokens, ring {ring.ring_len} + sink {layout.num_tokens}; "
          f"caches {fmt(ring.nbytes + sink.nbytes)}")
    ctx = torch.randn(20, cfg.text_dim, generator=g).to(device)
    ref = torch.randn(1, cfg.in_dim, 1, lat_h, lat_w, generator=g).to(device)
    motion = torch.randn(1, cfg.in_dim, cfg.lat_motion_frames, lat_h, lat_w, generator=g).to(device)
    z = torch.randn(1, cfg.in_dim, cfg.frames_per_block, lat_h, lat_w, generator=g).to(device)
    audio = torch.randn(1, cfg.audio_layers, cfg.audio_dim, 4 * cfg.frames_per_block, generator=g).to(device)

    rows = []
    out_resident = None
    if not args.skip_resident:
        with torch.no_grad():
            text = model.embed_text(ctx)
        prefill(model, ref, motion, text, sink, device)
        inputs = (z, 500.0, audio, text, ring, sink)
        peak_reset(device)
        sec, out_resident = time_forward(model, inputs, device, args.warmup, args.iters)
        rows.append(("resident", f"{cfg.num_layers}/{cfg.num_layers}", weights, sec, peak(device), 0))

    sizes, base = group_nbytes(model), base_nbytes(model)
    if args.resident is not None:
        k = args.resident
    elif args.budget_gb is not None:
        k = choose_resident_blocks(int(args.budget_gb * GB), sizes, base)
    else:
        k = 0
    streamer = apply_block_streaming(model, k, device)
    streamed = streamer.streamed
    per_forward = sum(gr.nbytes for gr in streamed) if len(streamed) > 2 else 0
    pinned = all(gr.source.is_pinned() for gr in streamed) if device.type == "cuda" and streamed else False
    with torch.no_grad():
        text = model.embed_text(ctx)
    if args.skip_resident:
        prefill(model, ref, motion, text, sink, device)
    inputs = (z, 500.0, audio, text, ring, sink)
    peak_reset(device)
    sec, out_streamed = time_forward(model, inputs, device, args.warmup, args.iters)
    rows.append(("streaming", f"{k}/{cfg.num_layers}", streamer.nbytes_device, sec, peak(device), per_forward))

    print(f"\n{'mode':<10} {'resident':>9} {'weights on dev':>15} {'ms/forward':>11} {'peak alloc':>11} "
          f"{'H2D/forward':>12} {'H2D GB/s':>9}")
    for mode, res, wbytes, sec_, pk, h2d in rows:
        bw = f"{h2d / GB / sec_:.1f}" if h2d else "-"
        print(f"{mode:<10} {res:>9} {fmt(wbytes):>15} {sec_ * 1e3:>11.1f} {fmt(pk):>11} {fmt(h2d):>12} {bw:>9}")
    if len(rows) == 2:
        print(f"\nstreaming / resident time ratio: {rows[1][3] / rows[0][3]:.3f}")
        diff = (out_streamed.float() - out_resident.float()).abs().max().item()
        print(f"max |velocity difference|: {diff:.3e}")
    print(f"host buffers {fmt(streamer.nbytes_host)} ({'pinned' if pinned else 'not pinned'}), "
          f"slots {fmt(streamer.nbytes_slots)}, {len(streamed)} streamed groups")
    return 0


if __name__ == "__main__":
    sys.exit(main())
