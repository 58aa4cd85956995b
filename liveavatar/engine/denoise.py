"""The denoise stage: one or more consecutive denoising steps of every block, with their caches.

A `DenoiseStage` owns steps [first, first + count) of the sampler: one ring KV cache per step (on the
device with or without its copy of the sink tokens, in FP8 or in host memory, as the runtime
configuration places step i), its own copy of the sink cache and, for staged device rings, one
layer's staging buffer shared by them. It takes a block's latents in and gives them back after its
steps; the single-process engine chains stages one after another, a pipeline puts each on its own
device or process. Its inputs besides the latents are the block task (frame start, audio features,
rolling-sink distances) and the conditioning (text context; reference and motion latents for the
sink prefill), and the sink refresh arrives as an explicit event (`refresh`).

The orchestration the model does not do lives here: ring slots and active lengths, the RoPE tables
of the block's tokens and of the rolled sink of every step (computed in host memory, uploaded in one
copy per block), the text cross-attention keys and values (once per session) and each step's time
embedding (once per stage). Nothing on a block's path waits for the device: with a compiled DiT
(`liveavatar.runtime.compile`) the forwards see the same shapes at every block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from liveavatar.config import DiTConfig
from liveavatar.engine.sampler import Schedule, euler_step
from liveavatar.engine.task import BlockTask
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.models.layout import SinkLayout
from liveavatar.models.rope import grid_factors
from liveavatar.runtime.compile import is_compiled
from liveavatar.runtime.device import to_device
from liveavatar.runtime.kv_cache import (
    BlockAttention,
    HostRingKVCache,
    RingKVCache,
    SinkCache,
    SinkPrefill,
    StagedRingKVCache,
)
from liveavatar.runtime.memory import RuntimeConfig, ring_class


def ring_position(ring: RingKVCache, frame_start: int, frames: int) -> tuple[int, int]:
    """(slot, active): where a block at latent frame `frame_start` writes in the ring, and how many ring
    tokens it attends to (the ring fills up during the first blocks, then wraps)."""
    start, seg = frame_start * ring.fs, frames * ring.fs
    slot = start % ring.ring_len
    if slot + seg > ring.ring_len:
        raise ValueError("a block does not fit the ring: frames_per_block must divide ring_frames")
    return slot, (ring.ring_len if start >= ring.ring_len else start + seg)


def _block_tables(cfg: DiTConfig, layout: SinkLayout, frame_start: int, frames: int):
    h2, w2 = layout.h // cfg.patch_size[1], layout.w // cfg.patch_size[2]
    return grid_factors(range(frame_start, frame_start + frames), range(h2), range(w2), cfg.rope_split)


def _sink_tables(cfg: DiTConfig, layout: SinkLayout, frame_start: int, d: int):
    roll = max(0, frame_start - (cfg.sink_ref_pos - d))
    return layout.rope(cfg, cfg.sink_ref_pos + roll)


def block_rope(cfg: DiTConfig, layout: SinkLayout, frame_start: int, frames: int, device):
    """cos/sin [frames·fs, d/2] of a block's tokens at latent frames [frame_start, frame_start + frames)."""
    cos, sin = _block_tables(cfg, layout, frame_start, frames)
    return to_device(cos, device), to_device(sin, device)


def sink_rope(cfg: DiTConfig, layout: SinkLayout, frame_start: int, d: int, device):
    """cos/sin of the sink tokens with the reference frame rolled to position max(30, F0 + d)."""
    cos, sin = _sink_tables(cfg, layout, frame_start, d)
    return to_device(cos, device), to_device(sin, device)


def block_tables(cfg: DiTConfig, layout: SinkLayout, frame_start: int, frames: int, distances, device):
    """The block's RoPE tables and the rolled sink's for each distance, in one host-to-device copy:
    (cos, sin) of the block and a list of (cos, sin) of the sink, one per distance."""
    block = _block_tables(cfg, layout, frame_start, frames)
    sinks = [_sink_tables(cfg, layout, frame_start, d) for d in distances]
    tables = [*block, *(t for pair in sinks for t in pair)]
    flat = to_device(torch.cat([t.reshape(-1) for t in tables]), device)
    parts = [p.view(t.shape) for p, t in zip(flat.split([t.numel() for t in tables]), tables, strict=True)]
    return (parts[0], parts[1]), [(parts[2 + 2 * j], parts[3 + 2 * j]) for j in range(len(sinks))]


def block_attention(cfg: DiTConfig, ring: RingKVCache, sink: SinkCache, frame_start: int, d: int,
                    frames: int, device, rope=None, sink_tables=None, static: bool = False) -> BlockAttention:
    """The attention context of one block forward (`rope`, `sink_tables`: the block's and the rolled
    sink's tables, if already uploaded; `static`: the same shapes at every slot, for a compiled DiT)."""
    slot, active = ring_position(ring, frame_start, frames)
    rope = rope or block_rope(cfg, sink.layout, frame_start, frames, device)
    sink_tables = sink_tables or sink_rope(cfg, sink.layout, frame_start, d, device)
    return BlockAttention(ring, sink, rope, sink_tables, slot, active, frames * ring.fs, static)


def sink_prefill(cfg: DiTConfig, sink: SinkCache, device) -> SinkPrefill:
    cos, sin = sink.layout.rope(cfg, cfg.sink_ref_pos)
    return SinkPrefill(sink, (to_device(cos, device), to_device(sin, device)))


class DenoiseStage:
    """Steps `steps` (consecutive indices into `schedule`) of every block, on `device`."""

    def __init__(self, dit: CausalS2VDiT, schedule: Schedule, steps: Sequence[int], layout: SinkLayout,
                 device, dtype: torch.dtype, runtime: RuntimeConfig | None = None, heads: int | None = None):
        """`heads`: the attention heads this stage's caches hold (a sequence-parallel rank's share;
        default all)."""
        self.dit, self.schedule, self.steps = dit, schedule, list(steps)
        if not self.steps or self.steps != list(range(self.steps[0], self.steps[0] + len(self.steps))):
            raise ValueError(f"a denoise stage owns consecutive steps, got {self.steps}")
        self.cfg, self.layout, self.device, self.dtype = dit.cfg, layout, torch.device(device), dtype
        runtime = runtime or RuntimeConfig()
        n_dev = len(schedule) if runtime.kv_on_device is None else runtime.kv_on_device
        self.rings = {}
        staging = None  # the staged device rings of a stage (FP8, shared sink) share one layer's staging buffers
        resident = ring_class(runtime)  # the planner's class for the rings on the device
        for i in self.steps:
            kind = resident if i < n_dev else HostRingKVCache
            extra = {"staging": staging} if issubclass(kind, StagedRingKVCache) else {}
            self.rings[i] = kind.allocate(self.cfg, layout.fs, dtype, self.device, heads=heads,
                                          sink_tokens=layout.num_tokens, **extra)
            staging = getattr(self.rings[i], "staging", staging)
        self.staging = staging
        self.sink = SinkCache.allocate(self.cfg, layout, dtype, self.device, heads=heads)
        self.timesteps = torch.tensor(schedule.timesteps, dtype=torch.float32, device=self.device)
        self.times: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # (step, B, F) -> block_time
        self.text = self.text_kv = self.motion_latents = None

    def start(self, text: torch.Tensor, ref_latent: torch.Tensor, motion_latents: torch.Tensor) -> None:
        """Take the conditioning and prefill the sink with the reference and motion latents."""
        self._set_text(text)
        self.motion_latents = motion_latents.to(self.device)
        self.refresh(ref_latent)

    def _set_text(self, text: torch.Tensor) -> None:
        self.text = text.to(self.device)
        # Blocks whose weights arrive per block (streamed, or gathered from shards, by pre-forward hooks)
        # compute their text K/V inside their forward; resident ones once per session, here.
        streamed = any(block._forward_pre_hooks for block in self.dit.blocks[1:])
        with torch.no_grad():
            self.text_kv = self.text if streamed else self.dit.text_kv(self.text)

    def refresh(self, ref_latent: torch.Tensor) -> None:
        """The sink (re-)prefill with `ref_latent` [1, C, 1, h, w] as the reference (the sink refresh
        event carries the first generated latent)."""
        with torch.no_grad():
            self.dit.prefill_sink(ref_latent.to(self.device), self.motion_latents, self.text_kv,
                                  sink_prefill(self.cfg, self.sink, self.device))

    def __call__(self, task: BlockTask, z: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's steps of `task`; z: [1, C, F, h, w] latents after the previous steps (the task's
        noise when this stage owns step 0). Returns the latents after the last owned step."""
        z = to_device(task.noise, self.device) if z is None else z.to(self.device)
        frames = z.shape[2]
        audio = to_device(task.audio, self.device)
        rope, sinks = block_tables(self.cfg, self.layout, task.frame_start, frames,
                                   [task.distances[i] for i in self.steps], self.device)
        static = is_compiled(self.dit)
        with torch.no_grad():
            for j, i in enumerate(self.steps):
                ctx = block_attention(self.cfg, self.rings[i], self.sink, task.frame_start, task.distances[i],
                                      frames, self.device, rope, sinks[j], static)
                v = self.dit(z, self._time(i, z.shape[0], frames), audio, self.text_kv, ctx)
                z = euler_step(z, v, self.schedule, i)
        return z

    def _time(self, i: int, batch: int, frames: int):
        """Step i's time embedding (computed once per stage)."""
        if (i, batch, frames) not in self.times:
            self.times[i, batch, frames] = self.dit.block_time(self.timesteps[i:i + 1], batch, frames)
        return self.times[i, batch, frames]

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"steps": self.steps, "sink": self.sink.tensors(),
                "rings": {i: ring.tensors() for i, ring in self.rings.items()}}

    def load_state_dict(self, state: dict, text: torch.Tensor, motion_latents: torch.Tensor) -> None:
        if list(state["steps"]) != self.steps:
            raise ValueError(f"saved stage owns steps {state['steps']}, this one {self.steps}")
        self._set_text(text)
        self.motion_latents = motion_latents.to(self.device)
        self.sink.load(state["sink"])
        for i, ring in self.rings.items():
            ring.load(state["rings"][i])

    @property
    def device_nbytes(self) -> int:
        staging = 0 if self.staging is None else sum(t.nbytes for t in self.staging)
        return self.sink.nbytes + sum(r.device_nbytes for r in self.rings.values()) + staging

    def close(self) -> None:
        """Free every cache now (host-staged caches wait for their copies in flight first)."""
        for ring in self.rings.values():
            ring.close()
        self.sink.close()
        self.rings, self.text, self.text_kv, self.motion_latents = {}, None, None, None
        self.staging = None
        self.times = {}


__all__ = ["DenoiseStage", "block_attention", "block_rope", "block_tables", "ring_position", "sink_prefill",
           "sink_rope"]
