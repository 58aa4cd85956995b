"""The DiT block on the CPU: this revision's eager and compiled block against the eager code of an
earlier revision (loaded from git in the same run), ratios side by side.

    python benchmarks/bench_block.py --base c1ca3c7 --dim 512 --layers 4 --latent 16

Three timings at the same weights and inputs, steady state (the ring full; frame 12, it wraps):
- `base forward`: the whole DiT forward of revision `--base` (its dit.py and kv_cache.py): the sink
  re-roped in every layer, ring and sink concatenated per layer, text K/V and time embedding per call;
- `forward`: this revision's forward with the stage's caches (text K/V once per session, time
  embedding once per step, one K/V buffer per layer, the sink re-roped once per forward);
- `block eager` / `block compiled`: one transformer block alone, eager and `apply_compile` (inductor),
  against one layer's `LayerKV`.
Also checks that the base and this revision give the same velocity.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from liveavatar.config import TINY
from liveavatar.engine.denoise import block_attention, block_rope, ring_position, sink_prefill, sink_rope
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.models.layout import SinkLayout
from liveavatar.runtime import kv_cache
from liveavatar.runtime.compile import apply_compile

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str, path: str, name: str):
    """Module `path` of git revision `rev`, imported under `name`."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                         check=True).stdout
    f = Path(tempfile.mkdtemp()) / f"{name}.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location(name, f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def timeit(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="c1ca3c7", help="the revision to compare with (before the fused caches)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--latent", type=int, default=16, help="latent height = width (tokens per frame: (n/2)^2)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = replace(TINY.dit, dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.heads, num_layers=args.layers,
                  audio_inject_layers=(0,))
    old_dit = load_revision(args.base, "liveavatar/models/dit.py", "base_dit")
    old_kv = load_revision(args.base, "liveavatar/runtime/kv_cache.py", "base_kv_cache")

    torch.manual_seed(0)
    new = CausalS2VDiT(cfg).eval()
    old = old_dit.CausalS2VDiT(cfg).eval()
    old.load_state_dict(new.state_dict())
    h = w = args.latent
    layout = SinkLayout(h, w)
    g = torch.Generator().manual_seed(1)
    text_in = torch.randn(7, cfg.text_dim, generator=g)
    ref = torch.randn(1, cfg.in_dim, 1, h, w, generator=g)
    motion = torch.randn(1, cfg.in_dim, 19, h, w, generator=g)
    z = torch.randn(1, cfg.in_dim, 3, h, w, generator=g)
    audio = torch.randn(1, 25, cfg.audio_dim, 12, generator=g)
    t = torch.tensor([857.69])
    f0, d = 12, 6  # the ring is full: steady state

    with torch.no_grad():
        text = new.embed_text(text_in)
        # this revision: the stage's caches
        sink = kv_cache.SinkCache.allocate(cfg, layout, torch.float32)
        ring = kv_cache.RingKVCache.allocate(cfg, layout.fs, torch.float32, sink_tokens=layout.num_tokens)
        text_kv = new.text_kv(text)
        new.prefill_sink(ref, motion, text_kv, sink_prefill(cfg, sink, "cpu"))
        time_emb = new.block_time(t, 1, 3)
        # the base revision's caches
        osink = old_kv.SinkCache.allocate(cfg, layout, torch.float32)
        oring = old_kv.RingKVCache.allocate(cfg, layout.fs, torch.float32)
        old.prefill_sink(ref, motion, text, old_kv.SinkPrefill(osink, layout.rope(cfg, cfg.sink_ref_pos)))
        slot, active = ring_position(ring, f0, 3)

        def run_new():
            return new(z, time_emb, audio, text_kv, block_attention(cfg, ring, sink, f0, d, 3, "cpu"))

        def run_old():
            ctx = old_kv.BlockAttention(oring, osink, block_rope(cfg, layout, f0, 3, "cpu"),
                                        sink_rope(cfg, layout, f0, d, "cpu"), slot, active)
            return old(z, t, audio, text, ctx)

        v_new, v_old = run_new(), run_old()
        same = torch.equal(v_new, v_old)
        diff = (v_new - v_old).abs().max().item()
        t_old, t_new = timeit(run_old, args.reps), timeit(run_new, args.reps)

        block = new.blocks[1]
        lq = 3 * layout.fs
        x = torch.randn(1, lq, cfg.dim, generator=g)
        ctx = block_attention(cfg, ring, sink, f0, d, 3, "cpu")
        cache = ctx.layer(1)
        e0 = time_emb[1]

        def run_block():
            return block(x, e0, text_kv[1], cache, 3)

        t_block = timeit(run_block, args.reps)
        eager_out = run_block()
        apply_compile(new)
        t0 = time.perf_counter()
        compiled_out = run_block()
        t_compile = time.perf_counter() - t0
        t_block_c = timeit(run_block, args.reps)
        cdiff = (compiled_out - eager_out).abs().max().item()

    print(f"dim {cfg.dim}, {cfg.num_heads} heads, {cfg.num_layers} layers, latent {h}x{w}: {lq} query tokens, "
          f"ring {ring.ring_len} + sink {layout.num_tokens} keys, text {cfg.text_len}; {args.threads} threads; "
          f"median of {args.reps}")
    print(f"velocity, base vs this revision: identical={same} (max abs diff {diff:.2e})")
    print("| what | ms | ratio |")
    print("|---|---|---|")
    print(f"| forward, base revision {args.base} (eager) | {1e3 * t_old:.1f} | 1.00 |")
    print(f"| forward, this revision (eager) | {1e3 * t_new:.1f} | {t_old / t_new:.2f}x faster |")
    print(f"| one block, eager | {1e3 * t_block:.2f} | 1.00 |")
    print(f"| one block, compiled (inductor; first call {t_compile:.1f} s) | {1e3 * t_block_c:.2f} | "
          f"{t_block / t_block_c:.2f}x faster (max abs diff {cdiff:.1e}) |")


if __name__ == "__main__":
    main()
