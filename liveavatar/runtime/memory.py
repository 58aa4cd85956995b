"""Memory model and planner: what a configuration needs on each GPU, before anything is loaded.

Every number comes from the objects and shapes the runtime itself allocates, not from a separate
guess: DiT weights per streaming group and dtype from the model built on `meta` (with `apply_fp8`
applied on meta for FP8), the block-streaming slots from `liveavatar.runtime.offload`, ring and sink KV
caches from `RingKVCache.bytes_for` / `SinkCache.bytes_for`, the streaming VAE state from
`stream_state_nbytes`, and the encoders' weights from the models built on meta. Activation
workspaces are derived from shapes (`block_workspace_bytes`, `vae_decode_workspace_bytes`): the
largest set of tensors alive at once in one block forward / one latent decode of this
implementation. They have not been measured on a GPU yet (docs/memory.md says so).

The sink tokens of the bf16 rings on the GPU cost memory or traffic (`RuntimeConfig.kv_sink`): a copy
after each ring (`per_ring`), or stored once and staged per layer with the ring (`shared`: smaller
rings plus one staging buffer, and the copies in the speed model); `plan()` weighs both.

`plan()` enumerates the runtime configurations this engine can run on one GPU, predicts each one's
peak and time per block (`liveavatar.runtime.speed`: the counted work of a forward at the rates of the
GPU, `liveavatar.runtime.gpus`), and returns the fastest that fits, with the exact `generate` flags.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace

import torch

from liveavatar.config import Preset
from liveavatar.models.layout import SinkLayout
from liveavatar.runtime.gpus import GPUSpec
from liveavatar.runtime.kv_cache import FP8RingKVCache, HostRingKVCache, RingKVCache, SinkCache, StagedRingKVCache

GiB = 2**30
GB = 10**9
BF16 = torch.bfloat16
CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside the caching allocator
FRAGMENTATION = 0.05  # share of the budget kept free for allocator fragmentation
KV_SINK_MODES = ("auto", "per_ring", "shared")


@dataclass(frozen=True)
class RuntimeConfig:
    """One GPU's layout of a generation. Each field maps onto a `liveavatar generate` flag."""

    fp8: bool = False  # --fp8: DiT Linear weights in e4m3
    resident_blocks: int | None = None  # --resident_blocks K: the rest streamed from host (None: all)
    kv_on_device: int | None = None  # --kv_on_device N: step caches kept on the GPU (None: all)
    kv_fp8: bool = False  # --kv_fp8: the step caches kept on the GPU store K/V in FP8 e4m3
    t5_cpu: bool = False  # --t5_cpu: text encoder runs on the CPU
    offload_model: bool = True  # --offload_model: encoders live in host memory, on the GPU only while running
    attention: str = "auto"  # --attention: the SDPA kernel (liveavatar.runtime.attention)
    # --kv_sink: where resident bf16 rings keep the sink tokens: per_ring (a copy after each ring: no copy
    # per layer), shared (stored once, staged per layer with the ring), auto (the planner's choice where
    # `generate` plans for a GPU, else per_ring)
    kv_sink: str = "auto"

    def __post_init__(self):
        if self.kv_sink not in KV_SINK_MODES:
            raise ValueError(f"kv_sink {self.kv_sink!r} is not one of {', '.join(KV_SINK_MODES)}")

    @property
    def sink_shared(self) -> bool:
        """Whether the rings kept on the GPU in the compute dtype are staged with a shared sink."""
        return self.kv_sink == "shared"

    def flags(self) -> list[str]:
        out = []
        if self.fp8:
            out.append("--fp8")
        if self.resident_blocks is not None:
            out += ["--resident_blocks", str(self.resident_blocks)]
        if self.kv_on_device is not None:
            out += ["--kv_on_device", str(self.kv_on_device)]
        if self.kv_fp8:
            out.append("--kv_fp8")
        if self.t5_cpu:
            out.append("--t5_cpu")
        out += ["--offload_model", "true" if self.offload_model else "false"]
        if self.attention != "auto":
            out += ["--attention", self.attention]
        if self.sink_shared:  # per_ring is what auto gives wherever per_ring fits
            out += ["--kv_sink", "shared"]
        return out


@dataclass
class GPUPlan:
    peak_bytes: int
    steady_bytes: int
    setup_bytes: int
    components: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    fits: bool
    config: RuntimeConfig
    height: int
    width: int
    infer_frames: int
    budget_bytes: int
    gpus: list[GPUPlan]
    seconds_per_block: float
    note: str = ""
    host: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "fits": self.fits,
            "config": asdict(self.config) | {"height": self.height, "width": self.width,
                                             "infer_frames": self.infer_frames},
            "flags": self.config.flags(),
            "budget_bytes": self.budget_bytes,
            "seconds_per_block_estimate": round(self.seconds_per_block, 3),
            "gpus": [{"peak_bytes": g.peak_bytes, "steady_bytes": g.steady_bytes, "setup_bytes": g.setup_bytes,
                      "components": g.components} for g in self.gpus],
            "host": {"bytes": sum(self.host.values()), "components": self.host},
            "note": self.note,
        }


# ---- weights, from the models built on meta ----------------------------------------------------


@functools.lru_cache(maxsize=8)
def _dit_weight_bytes(preset: Preset, fp8: bool) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Per streaming group: (tensor bytes when resident, flat-buffer bytes when streamed), and the
    bytes outside the groups, for the DiT in bf16 or FP8 (built on meta)."""
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.runtime.offload import base_nbytes, group_nbytes, stream_groups

    with torch.device("meta"):
        model = CausalS2VDiT(preset.dit).to(BF16)
    if fp8:
        from liveavatar.runtime.fp8 import apply_fp8

        apply_fp8(model)

    def raw(names):
        seen = {}
        for n in names:
            for t in list(model.get_submodule(n).parameters()) + list(model.get_submodule(n).buffers()):
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    return tuple(raw(n) for n in stream_groups(model)), tuple(group_nbytes(model)), base_nbytes(model)


@functools.lru_cache(maxsize=8)
def _encoder_bytes(preset: Preset) -> dict[str, int]:
    from liveavatar.models.sizes import encoder_elements

    return {name: n * BF16.itemsize for name, n in encoder_elements(preset).items()}


# ---- activations, derived from shapes ----------------------------------------------------------


def block_workspace_bytes(preset: Preset, layout: SinkLayout, itemsize: int = 2, ulysses: int = 1) -> int:
    """Peak transient bytes of one block forward (self-attention phase, the larger one).

    Alive at once: the residual in the compute dtype and in fp32, the modulated input, q/k/v, the roped
    query and key (fp32 working copies while rotating), the re-roped sink keys (fp32 copies), the
    concatenated keys and values over ring + sink, and the attention output. With `ulysses` ranks
    sharing the forward, each holds 1/ulysses of every token-wise and head-wise tensor, plus the
    all-to-all send and receive buffers of q, k and v."""
    if ulysses > 1:
        cfg = preset.dit
        lq = cfg.frames_per_block * layout.fs
        a2a = 2 * 3 * -(-lq // ulysses) * cfg.dim * itemsize
        text = cfg.text_len * cfg.dim * itemsize * 3
        return (block_workspace_bytes(preset, layout, itemsize) - text) // ulysses + text + a2a
    cfg = preset.dit
    d = cfg.dim
    lq = cfg.frames_per_block * layout.fs
    ls = layout.num_tokens
    lk = cfg.ring_frames * layout.fs + ls
    text = cfg.text_len * d * itemsize * 3  # text tokens + cross-attention K and V
    return (
        lq * d * (itemsize + 4)  # residual (dtype) + fp32 residual
        + lq * d * (4 + itemsize)  # modulated input fp32 -> dtype
        + 3 * lq * d * itemsize  # q, k, v
        + 2 * lq * d * 4  # fp32 rotation working copies
        + ls * d * (2 * 4 + itemsize)  # sink keys re-roped
        + 2 * lk * d * itemsize  # keys and values over ring + sink
        + lq * d * itemsize  # attention output
        + text
    )


def math_attention_bytes(preset: Preset, layout: SinkLayout, cfg: RuntimeConfig, itemsize: int = 2,
                         ulysses: int = 1) -> int:
    """With `--attention math` the self-attention materialises its scores and their softmax,
    [heads, Lq, Lk] each; the fused kernels never do (0)."""
    if cfg.attention != "math":
        return 0
    d = preset.dit
    lq = d.frames_per_block * layout.fs
    lk = d.ring_frames * layout.fs + layout.num_tokens
    return 2 * (d.num_heads // ulysses) * lq * lk * itemsize


@functools.lru_cache(maxsize=16)
def vae_decode_flops(preset: Preset, height: int, width: int) -> float:
    """FLOPs of decoding one block (3 latents) in the steady state, counted on the model built on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    from liveavatar.models.vae import VAEStreamState, WanVAE

    with torch.device("meta"):
        vae = WanVAE(preset.vae).to(BF16)
    f = preset.dit.frames_per_block
    z = torch.empty(1, preset.vae.z_dim, f + 1, height // 8, width // 8, device="meta", dtype=BF16)
    state = VAEStreamState()
    with torch.no_grad():
        vae.decode_stream_raw(z[:, :, :1], state)
        with FlopCounterMode(display=False) as counter:
            vae.decode_stream_raw(z[:, :, 1:], state)
    return float(counter.get_total_flops())


def vae_decode_workspace_bytes(preset: Preset, height: int, width: int, itemsize: int = 2) -> int:
    """Peak transient bytes of decoding one latent frame: at full resolution, four activations of
    the last stage (base width) over 4 output frames plus the 2 cached frames."""
    c = preset.vae.dim
    return 4 * c * (4 + 2) * height * width * itemsize


# ---- the memory table of one configuration -----------------------------------------------------


def audio_window_workspace_bytes(preset: Preset, span_seconds: float = 7.0) -> int:
    """Transient bytes of one windowed wav2vec2 call over `span_seconds` of audio (window + contexts):
    the stacked hidden states it returns plus the attention and feed-forward activations of a layer."""
    a = preset.audio
    frames = int(span_seconds * a.feature_rate)
    states = (a.num_hidden_layers + 1) * frames * a.hidden_size
    layer = frames * (4 * a.hidden_size + a.intermediate_size) + a.num_attention_heads * frames * frames
    return 2 * (states + layer)


def ring_class(cfg: RuntimeConfig):
    """The class of the ring caches `cfg` keeps on the GPU (what `DenoiseStage` allocates)."""
    return FP8RingKVCache if cfg.kv_fp8 else StagedRingKVCache if cfg.sink_shared else RingKVCache


def ring_bytes(preset: Preset, cfg: RuntimeConfig, layout: SinkLayout, heads: int | None = None) -> tuple[int, int]:
    """(bytes of one ring kept on the GPU, bytes of the staging buffer its stage shares, 0 if none).
    A `RingKVCache` holds the sink tokens after the ring in each layer's buffer; FP8 and shared-sink
    rings hold the ring tokens only and attend through one layer's staging buffer of ring + sink."""
    kind = ring_class(cfg)
    ring = kind.bytes_for(preset.dit, layout.fs, BF16, heads=heads, sink_tokens=layout.num_tokens)
    staged = issubclass(kind, StagedRingKVCache)
    staging = kind.staging_bytes_for(preset.dit, layout.fs, BF16, heads=heads, sink_tokens=layout.num_tokens
                                     ) if staged else 0
    return ring, staging


def components(preset: Preset, cfg: RuntimeConfig, height: int, width: int, infer_frames: int = 48,
               steps: int | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """(steady-state components, setup-only components) in bytes on the GPU for one configuration."""
    from liveavatar.models.vae import stream_state_nbytes

    steps = steps or preset.sampler.steps
    h, w = height // 8, width // 8
    layout = SinkLayout(h, w, preset.dit.zip_frame_buckets)
    fs = layout.fs
    groups, flat, base = _dit_weight_bytes(preset, cfg.fp8)
    k = len(groups) if cfg.resident_blocks is None else max(0, min(cfg.resident_blocks, len(groups)))
    rest = flat[k:]
    enc = _encoder_bytes(preset)
    n_dev = steps if cfg.kv_on_device is None else max(0, min(cfg.kv_on_device, steps))
    ring, staging = ring_bytes(preset, cfg, layout)
    dequant = 2 * preset.dit.ring_frames * fs * preset.dit.dim * (4 + 2) if (cfg.kv_fp8 and n_dev) else 0
    steady = {
        "dit.weights.resident_blocks": sum(groups[:k]),
        "dit.weights.other": base,
        "dit.stream_slots": min(2, len(rest)) * max(rest, default=0),
        "kv.ring_caches": n_dev * ring,
        "kv.staging": staging if n_dev else 0,
        "kv.host_ring_slots": (steps - n_dev) * HostRingKVCache.device_bytes_for(preset.dit, fs, BF16,
                                                                               sink_tokens=layout.num_tokens),
        "kv.sink": SinkCache.bytes_for(preset.dit, layout, BF16),
        # + FP8 ring read-back copies; + the score matrix and its softmax with the math attention kernel
        "dit.workspace": block_workspace_bytes(preset, layout) + dequant + math_attention_bytes(preset, layout, cfg),
        "vae.weights": enc["vae"],
        "vae.stream_state": stream_state_nbytes(preset.vae, h, w, BF16),
        "vae.decode_workspace": vae_decode_workspace_bytes(preset, height, width),
        "text_encoder": 0 if (cfg.offload_model or cfg.t5_cpu) else enc["t5"],
        "audio_encoder": 0 if cfg.offload_model else enc["wav2vec2"],
        # Windowed speech encoding runs between blocks: the encoder comes in when offloaded.
        "audio_encoder.windowed": audio_window_workspace_bytes(preset) + (enc["wav2vec2"] if cfg.offload_model else 0),
    }
    setup = {
        "text_encoder": 0 if cfg.t5_cpu or not cfg.offload_model else enc["t5"],
        "audio_encoder": enc["wav2vec2"] if cfg.offload_model else 0,
    }
    return steady, setup


def host_components(preset: Preset, cfg: RuntimeConfig, height: int, width: int,
                    steps: int | None = None) -> dict[str, int]:
    """Host (pinned or pageable) memory the configuration holds besides the process itself."""
    steps = steps or preset.sampler.steps
    fs = (height // 16) * (width // 16)
    _, flat, _ = _dit_weight_bytes(preset, cfg.fp8)
    k = len(flat) if cfg.resident_blocks is None else max(0, min(cfg.resident_blocks, len(flat)))
    n_dev = steps if cfg.kv_on_device is None else max(0, min(cfg.kv_on_device, steps))
    enc = _encoder_bytes(preset)
    return {
        "dit.streamed_blocks": sum(flat[k:]),
        "kv.host_ring_caches": (steps - n_dev) * RingKVCache.bytes_for(preset.dit, fs, BF16),
        "text_encoder": enc["t5"] if (cfg.offload_model or cfg.t5_cpu) else 0,
        "audio_encoder": enc["wav2vec2"] if cfg.offload_model else 0,
    }


def _peak(steady: dict[str, int], setup: dict[str, int]) -> tuple[int, int, int]:
    """(peak, steady, setup) totals. The DiT and VAE workspaces are never alive at once; the encoders
    run during setup, before the KV caches exist."""
    transients = ("dit.workspace", "vae.decode_workspace", "audio_encoder.windowed")
    transient = max(steady[k] for k in transients)
    base = sum(v for k, v in steady.items() if k not in transients)
    steady_total = base + transient
    weights = sum(v for k, v in steady.items() if k.startswith(("dit.weights", "dit.stream", "vae.weights",
                                                                 "text_encoder")) or k == "audio_encoder")
    setup_total = weights + max(setup.values(), default=0)
    return max(steady_total, setup_total), steady_total, setup_total


def forward_flops(preset: Preset, layout: SinkLayout) -> float:
    """Matmul FLOPs of one block forward (one denoising step) with a full ring, at `layout`'s latent size."""
    cfg = preset.dit
    d, lq = cfg.dim, cfg.frames_per_block * layout.fs
    lk = cfg.ring_frames * layout.fs + layout.num_tokens
    t = cfg.text_len
    per_block = 2 * lq * d * d * 6 + 2 * t * d * d * 2 + 2 * lq * d * cfg.ffn_dim * 2 + 4 * lq * (lk + t) * d
    inject = len(cfg.audio_inject_layers) * 2 * lq * d * d * 2
    return cfg.num_layers * per_block + inject


def step_seconds(preset: Preset, cfg: RuntimeConfig, gpu: GPUSpec, height: int, width: int,
                 steps: int | None = None, share: int = 1) -> float:
    """Estimated seconds of one denoising step of a block, averaged over the steps: the forward's
    compute (`speed.forward_seconds`; the steps whose rings share the sink stage ring + sink per layer)
    plus the stalls of its host transfers, which overlap compute through prefetch but only one layer
    ahead: a streamed block's weights come into the slot the block before the previous one freed
    (`offload`: two slots; the first two are fetched during the previous forward), a host-staged
    ring's layer while the layer before it computes. A layer stalls by what its copies take beyond one
    layer's compute; the step takes at least all of its copies. `share`: sequence-parallel ranks
    splitting the compute (transfers are per rank and not split)."""
    from liveavatar.runtime.speed import forward_seconds, forward_work

    steps = steps or preset.sampler.steps
    n_dev = steps if cfg.kv_on_device is None else cfg.kv_on_device
    compute = forward_seconds(forward_work(preset, height, width), gpu, cfg.fp8, cfg.kv_fp8, share=share)["total"]
    on_device = compute
    if cfg.sink_shared and not cfg.kv_fp8 and n_dev:
        on_device = forward_seconds(forward_work(preset, height, width, True), gpu, cfg.fp8, share=share)["total"]
    fs = (height // 16) * (width // 16)
    _, flat, _ = _dit_weight_bytes(preset, cfg.fp8)
    k = len(flat) if cfg.resident_blocks is None else cfg.resident_blocks
    link = gpu.link_gbps * GB
    weights = [b / link if j >= k + 2 else 0.0 for j, b in enumerate(flat)]  # per layer, not hidden by the slots
    ring = RingKVCache.bytes_for(preset.dit, fs, BF16) * 1.25 / len(flat) / link  # a layer in, the block's back

    def one(seconds: float, kv: float) -> float:
        layer = seconds / len(flat)
        stall = sum(max(0.0, w + kv - layer) for w in weights)
        return max(seconds + stall, (sum(flat[k:]) / link) + kv * len(flat))

    return (n_dev * one(on_device, 0.0) + (steps - n_dev) * one(compute, ring)) / steps


def decode_seconds(preset: Preset, gpu: GPUSpec, height: int, width: int) -> float:
    """Estimated seconds of decoding one block: the VAE's counted FLOPs at half the bf16 peak (its
    convolutions reach less of the peak than large GEMMs; an assumption)."""
    return vae_decode_flops(preset, height, width) / (gpu.tflops * 1e12 * 0.5)


def seconds_per_block(preset: Preset, cfg: RuntimeConfig, gpu: GPUSpec, height: int, width: int,
                      steps: int | None = None) -> float:
    """Estimated seconds per block on one GPU: every denoising step, then the decode."""
    steps = steps or preset.sampler.steps
    return steps * step_seconds(preset, cfg, gpu, height, width, steps) + decode_seconds(preset, gpu, height, width)


def predict(preset: Preset, cfg: RuntimeConfig, gpu: GPUSpec, height: int, width: int, infer_frames: int = 48,
            steps: int | None = None) -> Plan:
    """The plan of `cfg`. With `kv_sink="auto"`, the planner's choice: per_ring, or shared where only
    shared fits (the plan's config then says shared, and its note why)."""
    p = _predict(preset, cfg, gpu, height, width, infer_frames, steps)
    if cfg.kv_sink == "auto" and not p.fits:
        shared = _predict(preset, replace(cfg, kv_sink="shared"), gpu, height, width, infer_frames, steps)
        if shared.fits:
            shared.note = (f"--kv_sink auto: shared (per_ring needs {p.gpus[0].peak_bytes / GiB:.1f} GiB, over the "
                           f"{p.budget_bytes / GiB:.1f} GiB budget)")
            return shared
    return p


def _predict(preset: Preset, cfg: RuntimeConfig, gpu: GPUSpec, height: int, width: int, infer_frames: int = 48,
             steps: int | None = None) -> Plan:
    steady, setup = components(preset, cfg, height, width, infer_frames, steps)
    peak, steady_total, setup_total = _peak(steady, setup)
    comps = dict(steady)
    comps["setup.encoders"] = max(setup.values(), default=0)
    comps["cuda_context"] = CUDA_CONTEXT_BYTES
    budget = int(gpu.memory_bytes * (1 - FRAGMENTATION)) - CUDA_CONTEXT_BYTES
    return Plan(peak <= budget, cfg, height, width, infer_frames, budget,
                [GPUPlan(peak, steady_total, setup_total, comps)],
                seconds_per_block(preset, cfg, gpu, height, width, steps),
                host=host_components(preset, cfg, height, width, steps))


def candidates(preset: Preset, allow_fp8: bool = True, steps: int | None = None) -> list[RuntimeConfig]:
    """Every single-GPU layout the runtime supports, from most to least resident."""
    n_blocks = preset.dit.num_layers
    steps = steps or preset.sampler.steps
    out = []
    for fp8 in (False, True) if allow_fp8 else (False,):
        for kv in [None] + list(range(steps - 1, -1, -1)):
            for kv_fp8 in (False, True) if (kv != 0 and allow_fp8) else (False,):
                # The sink shared by the rings matters only where bf16 rings are on the GPU; per_ring first,
                # so that a tie keeps it.
                for kv_sink in ("per_ring", "shared") if (kv != 0 and not kv_fp8) else ("per_ring",):
                    for k in [None] + list(range(n_blocks - 1, -1, -1)):
                        for t5_cpu in (False, True):
                            out.append(RuntimeConfig(fp8=fp8, resident_blocks=k, kv_on_device=kv, kv_fp8=kv_fp8,
                                                     t5_cpu=t5_cpu, kv_sink=kv_sink))
    return out


def plan(preset: Preset, gpu: GPUSpec, height: int, width: int, infer_frames: int = 48,
         steps: int | None = None, allow_fp8: bool = True) -> Plan:
    """The fastest fitting configuration, or (fits=False) the least memory-hungry one with a hint."""
    best, smallest = None, None
    for cfg in candidates(preset, allow_fp8, steps):
        p = predict(preset, cfg, gpu, height, width, infer_frames, steps)
        if p.fits and (best is None or p.seconds_per_block < best.seconds_per_block - 1e-9):
            best = p
        if smallest is None or p.gpus[0].peak_bytes < smallest.gpus[0].peak_bytes:
            smallest = p
    if best is not None:
        return best
    smallest.note = (f"nothing fits in {gpu.memory_bytes / GiB:.0f} GiB at {height}x{width} (HxW): the smallest layout "
                     f"needs {smallest.gpus[0].peak_bytes / GiB:.1f} GiB; use a smaller --size or a GPU with "
                     f"more memory")
    return smallest


def format_plan(p: Plan, gpu: GPUSpec) -> str:
    """One screen: per-GPU components, the predicted peak against the budget, and the verdict."""
    g = p.gpus[0]
    lines = [f"{p.height}x{p.width} (HxW), {p.infer_frames} frames a clip, flags: {' '.join(p.config.flags())}",
             f"GPU 0: {gpu.memory_bytes / GiB:.1f} GiB, usable {p.budget_bytes / GiB:.2f} GiB "
             f"(less {FRAGMENTATION:.0%} for fragmentation and {CUDA_CONTEXT_BYTES / GiB:.1f} GiB CUDA context)"]
    for name, b in g.components.items():
        if b:
            lines.append(f"  {name:<30} {b / GiB:8.2f} GiB")
    lines.append(f"  {'peak (max of setup, steady)':<30} {g.peak_bytes / GiB:8.2f} GiB "
                 f"(setup {g.setup_bytes / GiB:.2f}, steady {g.steady_bytes / GiB:.2f})")
    host = sum(p.host.values())
    if host:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in p.host.items() if v)
        lines.append(f"host memory: {host / GiB:.2f} GiB ({parts})")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"{verdict} on the GPU; estimated {p.seconds_per_block:.2f} s a block "
                 f"({12 / p.seconds_per_block:.1f} frames/s) on {gpu.describe()} (an estimate from data-sheet "
                 "rates, not a measurement)")
    if p.note:
        lines.append(p.note)
    return "\n".join(lines)


__all__ = [
    "format_plan",
    "GPUSpec", "Plan", "RuntimeConfig", "block_workspace_bytes", "candidates", "components", "decode_seconds",
    "forward_flops", "plan", "predict", "ring_bytes", "ring_class", "seconds_per_block", "step_seconds",
    "vae_decode_flops",
    "vae_decode_workspace_bytes",
]
