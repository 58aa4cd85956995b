"""Memory scenarios of docs/memory.md: what the official runtime needs per GPU, and what this engine's
planner picks on one such GPU, at 704x384 (a 9:16 portrait image under `--size 704*384`), 48 frames.

Every number printed here is computed, nothing is measured: the official layouts (which caches and
weights sit on which GPU) follow /work/shared/spec (runtime.md §5-§6, architecture.md §10), and their
byte sizes come from this package's own component functions: the DiT built on `meta` (bf16, or FP8
with the official per-tensor scales via `fp8_nbytes`), `RingKVCache.bytes_for`, `SinkCache.bytes_for`
at the official fixed sink sizes (2,800 tokens single-GPU, 3,000 TPP), `stream_state_nbytes` and
`vae_decode_workspace_bytes` for the VAE, and `inspect_preset` for the T5 and VAE weights. The one
number taken as is from the spec is the official block-forward activation peak (about 1.3 GB,
architecture.md §10.3, itself derived from shapes). A GPU "fits" when the total is at most the
planner's usable budget: 95 % of the memory less a 0.6 GiB CUDA context. The speed figures are the
planner's estimates from the stated TFLOP/s and host-link bandwidth, not measurements.

    python benchmarks/memory_scenarios.py            # markdown, pasted into docs/memory.md
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liveavatar.config import S2V_14B  # noqa: E402
from liveavatar.io.media import target_size  # noqa: E402
from liveavatar.io.verify import inspect_preset  # noqa: E402
from liveavatar.models.dit import CausalS2VDiT  # noqa: E402
from liveavatar.models.vae import stream_state_nbytes  # noqa: E402
from liveavatar.runtime.fp8 import apply_fp8, fp8_nbytes  # noqa: E402
from liveavatar.runtime.kv_cache import RingKVCache, SinkCache, SinkLayout  # noqa: E402
from liveavatar.runtime.memory import (  # noqa: E402
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    GiB,
    forward_flops,
    plan,
    vae_decode_workspace_bytes,
)
from liveavatar.runtime.offload import group_nbytes  # noqa: E402

BF16 = torch.bfloat16
PRESET = S2V_14B
CFG = PRESET.dit
HEIGHT, WIDTH = target_size(16 * 80, 9 * 80, 704 * 384)  # a 9:16 portrait image under --size 704*384
FRAMES = 48
OFFICIAL_ACTIVATIONS = int(1.3e9)  # architecture.md §10.3: official block-forward peak, from shapes


def usable(gib: float) -> int:
    """The planner's budget for a GPU of `gib` GiB."""
    return int(gib * GiB * (1 - FRAGMENTATION)) - CUDA_CONTEXT_BYTES


def sizes() -> dict:
    """Byte sizes of every official component at HEIGHT x WIDTH."""
    with torch.device("meta"):
        dit = CausalS2VDiT(CFG).to(BF16)
    tensors = list(dit.parameters()) + list(dit.buffers())
    dit_bf16 = sum(t.numel() * t.element_size() for t in tensors)
    blocks = sum(p.numel() * p.element_size() for p in dit.blocks.parameters())
    stats = {s.name: s for s in inspect_preset(PRESET)}
    h, w = HEIGHT // 8, WIDTH // 8
    fs = SinkLayout(h, w, CFG.zip_frame_buckets).fs
    ring = RingKVCache.bytes_for(CFG, fs, BF16)

    def sink(tokens: int) -> int:  # the official caches are allocated at a fixed token count
        return SinkCache.bytes_for(CFG, SimpleNamespace(num_tokens=tokens), BF16)

    with torch.device("meta"):
        dit_q = apply_fp8(CausalS2VDiT(CFG).to(BF16))
    return {
        "streamed": {False: tuple(group_nbytes(dit)), True: tuple(group_nbytes(dit_q))},  # flat buffers
        "fs": fs,
        "sink_tokens": SinkLayout(h, w, CFG.zip_frame_buckets).num_tokens,
        "dit_bf16": dit_bf16,
        "dit_fp8": fp8_nbytes(dit, granularity="tensor"),  # the official per-tensor scheme
        "blocks_bf16": blocks,
        "block_bf16": blocks // CFG.num_layers,
        "root_bf16": dit_bf16 - blocks,  # the FSDP root unit: everything outside `blocks`
        "ring": ring,
        "sink_2800": sink(2800),
        "sink_3000": sink(3000),
        "t5": stats["t5"].bytes_as(BF16),
        "vae": stats["vae"].bytes_as(BF16),
        "w2v": stats["audio"].bytes_as(BF16),
        "vae_state": stream_state_nbytes(PRESET.vae, h, w, BF16),
        "vae_decode": vae_decode_workspace_bytes(PRESET, HEIGHT, WIDTH),
        "act": OFFICIAL_ACTIVATIONS,
    }


def official_scenarios(s: dict) -> list[dict]:
    """Per-GPU needs of the official runtime. Each role: (label, [(component, bytes)], extra notes)."""
    vae_gpu = [("VAE weights", s["vae"]), ("VAE stream state", s["vae_state"]),
               ("VAE decode workspace", s["vae_decode"])]
    step_cache_tpp = [("1 ring cache (its step)", s["ring"]), ("sink cache, 3,000 tokens", s["sink_3000"])]
    return [
        {"name": "5×24 GB, FSDP", "gib": 24, "setup": "TPP 4 DiT + 1 VAE GPU, --dit_fsdp --t5_fsdp, bf16 "
         "weights as FSDP's mixed precision keeps them, T5 shards resident", "roles": [
            ("DiT GPU (×4)", [("DiT shard (1/5, bf16)", s["dit_bf16"] // 5),
                              ("FSDP root unsharded (non-block weights)", s["root_bf16"]),
                              ("1 block all-gathered", s["block_bf16"]),
                              ("T5 shard (1/5)", s["t5"] // 5), ("VAE weights", s["vae"]),
                              *step_cache_tpp, ("activations (official)", s["act"])]),
            ("VAE GPU", [("DiT shard (1/5, bf16)", s["dit_bf16"] // 5), ("T5 shard (1/5)", s["t5"] // 5),
                         *vae_gpu]),
         ]},
        {"name": "4×24 GB (3 DiT + 1 VAE)", "gib": 24, "setup": "TPP with 3 steps, --fp8; T5 off the GPU "
         "with --t5_cpu or --offload_model True, resident in the scripts", "roles": [
            ("DiT GPU (×3)", [("DiT (fp8)", s["dit_fp8"]), *step_cache_tpp, ("activations (official)", s["act"])]),
            ("DiT GPU, T5 resident (the scripts)", [("DiT (fp8)", s["dit_fp8"]), ("T5", s["t5"]), *step_cache_tpp,
                                                    ("activations (official)", s["act"])]),
            ("VAE GPU", [("DiT copy (fp8, unused)", s["dit_fp8"]), *vae_gpu]),
         ]},
        {"name": "1×24 GB with offload", "gib": 24, "setup": "single GPU, --fp8 --offload_model True "
         "--offload_kv_cache: one step cache at a time on the GPU; the official code has no weight offload", "roles": [
            ("GPU", [("DiT (fp8)", s["dit_fp8"]), ("1 ring cache, staged", s["ring"]),
                     ("its sink cache, 2,800 tokens", s["sink_2800"]), ("activations (official)", s["act"])]),
         ]},
        {"name": "1×48 GB FP8", "gib": 48, "setup": "single GPU, --fp8 --offload_model True: the default "
         "layout, 4 ring caches + a shared 2,800-token sink on the GPU", "roles": [
            ("GPU", [("DiT (fp8)", s["dit_fp8"]), ("4 ring caches", 4 * s["ring"]),
                     ("sink cache, 2,800 tokens", s["sink_2800"]), ("activations (official)", s["act"])]),
            ("GPU, with --offload_kv_cache", [("DiT (fp8)", s["dit_fp8"]), ("1 ring cache, staged", s["ring"]),
                                              ("its sink cache, 2,800 tokens", s["sink_2800"]),
                                              ("activations (official)", s["act"])]),
         ]},
        {"name": "1×80 GB", "gib": 80, "setup": "single GPU, bf16, --offload_model True: the README setup",
         "roles": [
            ("GPU", [("DiT (bf16)", s["dit_bf16"]), ("4 ring caches", 4 * s["ring"]),
                     ("sink cache, 2,800 tokens", s["sink_2800"]), ("activations (official)", s["act"])]),
            ("GPU, with --fp8", [("DiT (fp8)", s["dit_fp8"]), ("4 ring caches", 4 * s["ring"]),
                                 ("sink cache, 2,800 tokens", s["sink_2800"]), ("activations (official)", s["act"])]),
         ]},
        {"name": "5×80 GB TPP", "gib": 80, "setup": "TPP 4 DiT + 1 VAE GPU, bf16, --offload_model False "
         "as in the scripts: T5 resident on every GPU", "roles": [
            ("DiT GPU (×4)", [("DiT (bf16)", s["dit_bf16"]), ("T5", s["t5"]), ("VAE weights", s["vae"]),
                              *step_cache_tpp, ("activations (official)", s["act"])]),
            ("VAE GPU", [("DiT copy (bf16, unused)", s["dit_bf16"]), ("T5", s["t5"]), *vae_gpu]),
         ]},
    ]


def gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def print_sizes(s: dict) -> None:
    print(f"## Sizes at {HEIGHT}x{WIDTH} (HxW), fs = {s['fs']} tokens a latent frame, {FRAMES} frames a clip\n")
    print("| component | GiB | GB |\n|---|---:|---:|")
    rows = [("DiT, bf16", "dit_bf16"), ("DiT, fp8 (official per-tensor scales)", "dit_fp8"),
            ("one transformer block, bf16", "block_bf16"), ("DiT outside the blocks (FSDP root), bf16", "root_bf16"),
            ("one ring KV cache (one step, 12 latent frames)", "ring"),
            (f"sink cache, exact ({s['sink_tokens']} tokens, this engine)", None),
            ("sink cache, 2,800 tokens (official single GPU)", "sink_2800"),
            ("sink cache, 3,000 tokens (official TPP)", "sink_3000"), ("umT5-XXL encoder", "t5"),
            ("VAE weights", "vae"), ("VAE stream state", "vae_state"),
            ("VAE decode workspace (estimate)", "vae_decode"),
            ("official block-forward activations (spec)", "act")]
    for label, key in rows:
        b = SinkCache.bytes_for(CFG, SinkLayout(HEIGHT // 8, WIDTH // 8), BF16) if key is None else s[key]
        print(f"| {label} | {gib(b)} | {b / 1e9:.2f} |")
    print()


def print_official(scenarios: list[dict]) -> None:
    print("## Official runtime, per GPU\n")
    for sc in scenarios:
        print(f"**{sc['name']}**: {sc['setup']}. Usable per GPU: {gib(usable(sc['gib']))} GiB.\n")
        print("| GPU | components (GiB) | total GiB (GB) | fits |\n|---|---|---:|---|")
        for role, parts in sc["roles"]:
            total = sum(b for _, b in parts)
            comps = "; ".join(f"{name} {gib(b)}" for name, b in parts)
            ok = "yes" if total <= usable(sc["gib"]) else "**no**"
            print(f"| {role} | {comps} | {gib(total)} ({total / 1e9:.2f}) | {ok} |")
        print()


def print_engine(s: dict) -> None:
    print("## This engine on one such GPU (`liveavatar plan --auto`)\n")
    from liveavatar.runtime.gpus import gpu_named

    print("| GPU | --auto picks | peak GiB | usable GiB | estimate s/block (frames/s) | host GiB "
          "| rates assumed |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name in ("rtx4090", "l40s", "a100-80gb", "h100-sxm", "h200"):
        gpu = gpu_named(name)
        fp8 = f"{gpu.fp8_tflops:g} fp8" if gpu.has_fp8 else "no fp8"
        rates = f"{gpu.tflops:g} bf16 / {fp8} TFLOP/s, {gpu.mem_gbps:g} GB/s memory, {gpu.link_gbps:g} GB/s host"
        for allow_fp8, tag in ((True, ""), (False, " --no_fp8")):
            p = plan(PRESET, gpu, HEIGHT, WIDTH, FRAMES, allow_fp8=allow_fp8)
            picks = " ".join(p.config.flags()) if p.fits else "nothing fits"
            host = sum(p.host.values())  # the planner's host-memory components
            print(f"| `--gpu {name}`{tag} | `{picks}` | {gib(p.gpus[0].peak_bytes)} | {gib(p.budget_bytes)} | "
                  f"{p.seconds_per_block:.2f} ({12 / p.seconds_per_block:.1f}) | {gib(host)} | "
                  f"{rates} |")
    layout = SinkLayout(HEIGHT // 8, WIDTH // 8, CFG.zip_frame_buckets)
    print(f"\nOne block forward (one denoising step) at {HEIGHT}x{WIDTH}: {forward_flops(PRESET, layout) / 1e12:.1f} "
          f"TFLOP of matmuls; a block is {PRESET.sampler.steps} forwards and 12 video frames.")


def main() -> int:
    s = sizes()
    print_sizes(s)
    print_official(official_scenarios(s))
    print_engine(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
