"""The memory and speed planner for several GPUs: every rank's bytes, the pipeline's throughput, and
the `torchrun` command, for any parallel layout (`liveavatar plan --gpus 5x24 --auto`).

Per rank, the bytes come from the objects that rank allocates, computed the way the runtime computes
them: DiT weights whole (or block-streamed) or sharded (`sharding.sharded_nbytes`: 1/G of every
block's flat buffer plus the two unsharded slots, the "unshard spike" and its prefetch buffer), the
ring caches of the stage's steps and its own sink with the rank's share of the heads
(`RingKVCache.bytes_for(heads=N/G)`), the block workspace of its share of the tokens and the all-to-all
buffers, the VAE where the conditioning is encoded (rank 0) and where blocks are decoded, and the
encoders at setup on rank 0. The same budget rule as on one GPU applies to every rank.

Speed: a stage takes its steps' time: the single-GPU speed model's step (`memory.step_seconds`:
linears at the bf16 or FP8 rate, attention at the bf16 rate, elementwise and quantisation traffic at
the memory bandwidth) with its work split over the G ranks, plus the all-to-alls of sequence
parallelism (4 per layer) at the GPU-to-GPU rate, with sharded-weight gathers overlapping compute
(the slower of the two counts). Blocks leave the pipeline at the pace of the slowest stage, or of
the decoder (its FLOPs counted on the VAE built on meta). These are estimates from data-sheet rates,
not measurements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from liveavatar.config import Preset
from liveavatar.distributed.layout import ParallelLayout, Role
from liveavatar.distributed.sharding import sharded_nbytes
from liveavatar.models.layout import SinkLayout
from liveavatar.runtime import memory as m
from liveavatar.runtime.kv_cache import HostRingKVCache, SinkCache


@dataclass
class RankPlan:
    role: str
    peak_bytes: int
    steady_bytes: int
    setup_bytes: int
    components: dict[str, int] = field(default_factory=dict)


@dataclass
class ParallelPlan:
    fits: bool
    layout: ParallelLayout
    config: m.RuntimeConfig
    height: int
    width: int
    infer_frames: int
    nnodes: int
    budget_bytes: int
    ranks: list[RankPlan]
    stage_seconds: list[float]  # one block through each denoise stage
    decode_seconds: float
    note: str = ""

    @property
    def seconds_per_block(self) -> float:
        return max(*self.stage_seconds, self.decode_seconds)

    @property
    def first_block_seconds(self) -> float:
        return sum(self.stage_seconds) + self.decode_seconds

    @property
    def margin_bytes(self) -> int:
        """Budget left on the fullest rank."""
        return self.budget_bytes - max(r.peak_bytes for r in self.ranks)

    def flags(self) -> list[str]:
        lay = self.layout
        out = ["--num_gpus_dit", str(lay.denoise_ranks)]
        if lay.decode_rank:
            out.append("--enable_vae_parallel")
        if lay.ulysses > 1:
            out += ["--ulysses_size", str(lay.ulysses)]
        if lay.shard_weights:
            out.append("--dit_fsdp")
        return out + self.config.flags()

    def command(self, size: str) -> str:
        per_node = self.layout.world // self.nnodes
        launch = f"torchrun --nproc_per_node {per_node}"
        if self.nnodes > 1:
            launch = (f"torchrun --nnodes {self.nnodes} --nproc_per_node {per_node} --rdzv_backend c10d "
                      "--rdzv_endpoint HOST:29500 --rdzv_id liveavatar")
        return f"{launch} -m liveavatar generate {' '.join(self.flags())} --size {size}"

    def to_json(self) -> dict:
        return {
            "fits": self.fits, "layout": asdict(self.layout) | {"world": self.layout.world, "nnodes": self.nnodes},
            "config": asdict(self.config) | {"height": self.height, "width": self.width,
                                             "infer_frames": self.infer_frames},
            "flags": self.flags(), "budget_bytes": self.budget_bytes, "margin_bytes": self.margin_bytes,
            "seconds_per_block_estimate": round(self.seconds_per_block, 3),
            "frames_per_second_estimate": round(12 / self.seconds_per_block, 2),
            "stage_seconds_estimate": [round(s, 3) for s in self.stage_seconds],
            "decode_seconds_estimate": round(self.decode_seconds, 3),
            "gpus": [{"rank": i, "role": r.role, "peak_bytes": r.peak_bytes, "steady_bytes": r.steady_bytes,
                      "setup_bytes": r.setup_bytes, "components": r.components} for i, r in enumerate(self.ranks)],
            "note": self.note,
        }


def message_bytes(preset: Preset, height: int, width: int, steps: int) -> int:
    """Bytes of one block message (header, latents, audio features, speech)."""
    cfg = preset.dit
    latents = cfg.in_dim * cfg.frames_per_block * (height // 8) * (width // 8)
    audio = cfg.audio_layers * cfg.audio_dim * 4 * cfg.frames_per_block
    speech = 4 * cfg.frames_per_block * 16000 // preset.fps + 1
    return 8 * (8 + steps) + 2 * (latents + audio) + 4 * speech


def rank_components(preset: Preset, cfg: m.RuntimeConfig, layout: ParallelLayout, role: Role, height: int,
                    width: int, infer_frames: int = 48) -> tuple[dict[str, int], dict[str, int]]:
    """(steady, setup) bytes on this rank's GPU."""
    tokens = SinkLayout(height // 8, width // 8, preset.dit.zip_frame_buckets)
    h, w = height // 8, width // 8
    enc = m._encoder_bytes(preset)
    steady: dict[str, int] = {}
    if role.stage is not None:
        heads = preset.dit.num_heads // layout.ulysses
        groups, flat, base = m._dit_weight_bytes(preset, cfg.fp8)
        if layout.shard_weights:
            shards, slots = sharded_nbytes(list(flat), layout.ulysses)
            steady |= {"dit.weights.shards": shards, "dit.weights.other": base, "dit.stream_slots": slots}
        else:
            k = len(groups) if cfg.resident_blocks is None else max(0, min(cfg.resident_blocks, len(groups)))
            rest = flat[k:]
            steady |= {"dit.weights.resident_blocks": sum(groups[:k]), "dit.weights.other": base,
                       "dit.stream_slots": min(2, len(rest)) * max(rest, default=0)}
        n_dev = layout.steps if cfg.kv_on_device is None else cfg.kv_on_device
        on_dev = sum(1 for i in role.steps if i < n_dev)
        ring, staging = m.ring_bytes(preset, cfg, tokens, heads=heads)
        dequant = 2 * preset.dit.ring_frames * tokens.fs * preset.dit.dim * 6 // layout.ulysses if (
            cfg.kv_fp8 and on_dev) else 0
        steady |= {
            "kv.ring_caches": on_dev * ring,
            "kv.staging": staging if on_dev else 0,
            "kv.host_ring_slots": (len(role.steps) - on_dev) * HostRingKVCache.device_bytes_for(
                preset.dit, tokens.fs, m.BF16, heads=heads, sink_tokens=tokens.num_tokens),
            "kv.sink": SinkCache.bytes_for(preset.dit, tokens, m.BF16, heads=heads),
            "dit.workspace": m.block_workspace_bytes(preset, tokens, ulysses=layout.ulysses) + dequant
            + m.math_attention_bytes(preset, tokens, cfg, ulysses=layout.ulysses),
            "text_context": preset.dit.text_len * preset.dit.dim * 2,
        }
    if role.decodes or role.frontend:
        steady["vae.weights"] = enc["vae"]
    if role.decodes:
        from liveavatar.models.vae import stream_state_nbytes

        steady["vae.stream_state"] = stream_state_nbytes(preset.vae, h, w, m.BF16)
        steady["vae.decode_workspace"] = m.vae_decode_workspace_bytes(preset, height, width)
    if role.leader or role.decodes:
        steady["pipeline.messages"] = 3 * message_bytes(preset, height, width, layout.steps)
    setup = {}
    if role.frontend:
        steady["text_encoder"] = 0 if (cfg.offload_model or cfg.t5_cpu) else enc["t5"]
        steady["audio_encoder"] = 0 if cfg.offload_model else enc["wav2vec2"]
        steady["audio_encoder.windowed"] = m.audio_window_workspace_bytes(preset) + (
            enc["wav2vec2"] if cfg.offload_model else 0)
        setup = {"text_encoder": 0 if cfg.t5_cpu or not cfg.offload_model else enc["t5"],
                 "audio_encoder": enc["wav2vec2"] if cfg.offload_model else 0}
    for name in ("dit.workspace", "vae.decode_workspace", "audio_encoder.windowed"):
        steady.setdefault(name, 0)
    return steady, setup


def stage_seconds(preset: Preset, cfg: m.RuntimeConfig, layout: ParallelLayout, gpu: m.GPUSpec, height: int,
                  width: int, steps: int, nnodes: int) -> float:
    """Seconds one block takes through a stage of `steps` steps."""
    tokens = SinkLayout(height // 8, width // 8, preset.dit.zip_frame_buckets)
    u = layout.ulysses
    compute = m.step_seconds(preset, cfg, gpu, height, width, layout.steps, share=u)  # one step, 1/u of the work
    if u == 1:
        return steps * compute
    lq = preset.dit.frames_per_block * tokens.fs
    per_rank = -(-lq // u) * preset.dit.dim * 2 * (u - 1) / u  # bytes one rank sends per all-to-all
    link = gpu.peer_gbps if u <= layout.world // nnodes else gpu.node_gbps
    comm = preset.dit.num_layers * 4 * per_rank / (link * m.GB)
    if layout.shard_weights:
        _, flat, _ = m._dit_weight_bytes(preset, cfg.fp8)
        gather = sum(flat) * (u - 1) / u / (link * m.GB)
        compute = max(compute, gather)
    return steps * (compute + comm)


def predict_parallel(preset: Preset, cfg: m.RuntimeConfig, layout: ParallelLayout, gpu: m.GPUSpec, height: int,
                     width: int, infer_frames: int = 48, nnodes: int = 1) -> ParallelPlan:
    budget = int(gpu.memory_bytes * (1 - m.FRAGMENTATION)) - m.CUDA_CONTEXT_BYTES
    ranks = []
    for role in layout.roles():
        steady, setup = rank_components(preset, cfg, layout, role, height, width, infer_frames)
        peak, steady_total, setup_total = m._peak(steady, setup)
        comps = dict(steady) | {"setup.encoders": max(setup.values(), default=0), "cuda_context": m.CUDA_CONTEXT_BYTES}
        ranks.append(RankPlan(role.describe(), peak, steady_total, setup_total, comps))
    stages = [stage_seconds(preset, cfg, layout, gpu, height, width, len(s), nnodes) for s in layout.stage_steps()]
    decode = m.decode_seconds(preset, gpu, height, width)
    if not layout.decode_rank:
        stages[-1] += decode
    fits = all(r.peak_bytes <= budget for r in ranks)
    return ParallelPlan(fits, layout, cfg, height, width, infer_frames, nnodes, budget, ranks, stages, decode)


def layouts(preset: Preset, n_gpus: int, nnodes: int = 1, steps: int | None = None) -> list[ParallelLayout]:
    """Every layout of `n_gpus` on `nnodes` equal nodes (sequence-parallel groups inside a node)."""
    steps = steps or preset.sampler.steps
    per_node = n_gpus // nnodes
    out = []
    for decode in (False, True):
        denoise = n_gpus - int(decode)
        for u in range(1, denoise + 1):
            if denoise % u or preset.dit.num_heads % u or denoise // u > steps or per_node % u:
                continue  # groups must not straddle nodes: their all-to-alls need the fast links
            for shard in (False, True) if u > 1 else (False,):
                out.append(ParallelLayout(denoise, u, shard, decode, steps))
    return out


def plan_parallel(preset: Preset, gpu: m.GPUSpec, n_gpus: int, height: int, width: int, infer_frames: int = 48,
                  nnodes: int = 1, allow_fp8: bool = True) -> ParallelPlan:
    """The fastest layout and runtime configuration that fits every rank, or (fits=False) the one that
    needs the least memory, with a hint."""
    best = smallest = None
    for layout in layouts(preset, n_gpus, nnodes):
        for cfg in m.candidates(preset, allow_fp8):
            if layout.shard_weights and cfg.resident_blocks is not None:
                continue
            p = predict_parallel(preset, cfg, layout, gpu, height, width, infer_frames, nnodes)
            if p.fits and (best is None or p.seconds_per_block < best.seconds_per_block - 1e-9):
                best = p
            if smallest is None or p.margin_bytes > smallest.margin_bytes:
                smallest = p
    if best is not None:
        return best
    need = max(r.peak_bytes for r in smallest.ranks)
    smallest.note = (f"nothing fits {n_gpus} GPUs of {gpu.memory_bytes / m.GiB:.0f} GiB at {height}x{width} (HxW): "
                     f"the smallest layout needs {need / m.GiB:.1f} GiB on its fullest rank; use a smaller --size or "
                     "more GPUs")
    return smallest


def format_parallel(p: ParallelPlan, gpu: m.GPUSpec, size: str) -> str:
    """The per-rank table, the verdict with the margin, the speed estimate and the command."""
    lay = p.layout
    lines = [f"{p.height}x{p.width} (HxW), {lay.world} GPUs of {gpu.memory_bytes / m.GiB:.1f} GiB"
             f"{f' on {p.nnodes} nodes' if p.nnodes > 1 else ''}, usable {p.budget_bytes / m.GiB:.2f} GiB each",
             "layout: " + "; ".join(r.role for r in p.ranks)]
    names = [n for n in p.ranks[0].components] + [n for r in p.ranks[1:] for n in r.components
                                                  if n not in p.ranks[0].components]
    names = list(dict.fromkeys(names))
    lines.append(f"  {'GiB':<26}" + "".join(f"{'rank ' + str(i):>9}" for i in range(len(p.ranks))))
    for name in names:
        values = [r.components.get(name, 0) for r in p.ranks]
        if any(values):
            lines.append(f"  {name:<26}" + "".join(f"{v / m.GiB:9.2f}" for v in values))
    lines.append(f"  {'peak':<26}" + "".join(f"{r.peak_bytes / m.GiB:9.2f}" for r in p.ranks))
    verdict = (f"fits, {p.margin_bytes / m.GiB:.2f} GiB to spare on the fullest rank" if p.fits
               else f"does NOT fit: {-p.margin_bytes / m.GiB:.2f} GiB over on the fullest rank")
    lines.append(f"{verdict}; estimated {p.seconds_per_block:.2f} s a block ({12 / p.seconds_per_block:.1f} "
                 f"frames/s; stages {', '.join(f'{s:.2f}' for s in p.stage_seconds)} s, decode "
                 f"{p.decode_seconds:.2f} s; first block after {p.first_block_seconds:.2f} s) on "
                 f"{gpu.describe()}, {gpu.peer_gbps:g} GB/s between GPUs (an estimate from data-sheet rates, not a "
                 "measurement)")
    if p.note:
        lines.append(p.note)
    if p.fits:
        lines.append("run: " + p.command(size))
    return "\n".join(lines)


__all__ = ["ParallelPlan", "RankPlan", "format_parallel", "layouts", "plan_parallel", "predict_parallel",
           "rank_components", "stage_seconds"]
