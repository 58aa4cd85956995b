"""The timestep pipeline: denoise stages on their own ranks, a block's latents passed rank to rank.

Every rank builds the stages its role needs (`liveavatar.distributed.layout`) from the same engine
parts the single-process session uses: rank 0 is the frontend (speech, audio features, block tasks;
`engine.frontend`) and encodes the conditioning once, which every rank receives; each denoise stage
(`engine.denoise.DenoiseStage`, its steps' ring caches and its own sink) runs its steps of every block
on its group of sequence-parallel ranks; the decode stage (`engine.decode.DecodeStage`) turns clean
latents into chunks on its own rank or on the last stage's first rank.

A block travels as one message between the stages' first ranks (point-to-point: header, latents,
audio features, the speech that plays with its frames), and inside a sequence-parallel group by
broadcast. A stage posts the receive of block n+1 before it computes block n, and sends without
waiting, so receiving, computing and sending overlap. The sink refresh does not drain the pipeline:
the last stage sends the first clean latent to every denoise rank as soon as block 0 is done (four
blocks before clip 1 starts, when a stage may need it), and each rank picks it up when it reaches
the first block of clip 1.

Every send, receive and collective runs under the process group's timeout; a rank that fails raises,
and `liveavatar.distributed.launch` turns that into one line naming the rank, its role and the cause.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from liveavatar.distributed.layout import ParallelLayout, Role
from liveavatar.engine.conditioning import Conditioning
from liveavatar.engine.decode import DecodeStage
from liveavatar.engine.denoise import DenoiseStage
from liveavatar.engine.frontend import Frontend
from liveavatar.engine.sampler import make_schedule
from liveavatar.engine.session import Chunk, output_chunk
from liveavatar.engine.task import BlockTask
from liveavatar.models.layout import SinkLayout

# header: block, stop, frame_start, refresh, video_start, keep0, keep1, speech samples, then one
# rolling-sink distance per step
_FIXED = 8
TAG_HEADER, TAG_LATENTS, TAG_AUDIO, TAG_SPEECH, TAG_REFRESH = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Shapes:
    """The fixed shapes of a block message."""

    latents: tuple[int, ...]  # [1, C, F, h, w]
    audio: tuple[int, ...]  # [1, 25, C_a, 4F]
    speech: int  # samples, at most
    steps: int
    dtype: torch.dtype

    @property
    def header(self) -> int:
        return _FIXED + self.steps

    def nbytes(self) -> int:
        """Bytes of one block message on the wire."""
        item = torch.empty((), dtype=self.dtype).element_size()
        n = lambda s: int(np.prod(s))  # noqa: E731
        return 8 * self.header + item * (n(self.latents) + n(self.audio)) + 4 * self.speech


@dataclass
class Message:
    """One block between stages: its task (without noise) and its current latents."""

    task: BlockTask | None  # None: the stream is over
    latents: torch.Tensor | None

    @property
    def stop(self) -> bool:
        return self.task is None


def message_tensors(msg: Message, sh: Shapes, device: torch.device) -> list[torch.Tensor]:
    """The four tensors of a message on the wire: header, latents, audio features, speech."""
    task = msg.task
    header = torch.zeros(sh.header, dtype=torch.int64)
    speech = torch.zeros(sh.speech, dtype=torch.float32)
    latents = torch.zeros(sh.latents, dtype=sh.dtype, device=device)
    audio = torch.zeros(sh.audio, dtype=sh.dtype, device=device)
    if task is None:
        header[1] = 1
    else:
        n_speech = len(task.speech)
        header[:_FIXED] = torch.tensor([task.index, 0, task.frame_start, int(task.refresh_sink), task.video_start,
                                        task.keep[0], task.keep[1], n_speech])
        header[_FIXED:] = torch.tensor(task.distances)
        speech[:n_speech] = torch.from_numpy(np.asarray(task.speech, dtype=np.float32))
        latents, audio = msg.latents.to(device, sh.dtype), task.audio.to(device, sh.dtype)
    return [header.to(device), latents.contiguous(), audio.contiguous(), speech.to(device)]


def empty_message_tensors(sh: Shapes, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(sh.header, dtype=torch.int64, device=device),
            torch.empty(sh.latents, dtype=sh.dtype, device=device),
            torch.empty(sh.audio, dtype=sh.dtype, device=device),
            torch.empty(sh.speech, dtype=torch.float32, device=device)]


_TAGS = (TAG_HEADER, TAG_LATENTS, TAG_AUDIO, TAG_SPEECH)


class Link:
    """Block messages from rank `src` to rank `dst` (point-to-point, in order)."""

    def __init__(self, src: int, dst: int, shapes: Shapes, device: torch.device):
        self.src, self.dst, self.shapes, self.device = src, dst, shapes, device
        self.sent: list[dist.Work] = []
        self.bytes_sent = 0

    def send(self, msg: Message) -> None:
        """Queue `msg` (returns at once); the previous message's sends complete first."""
        for work in self.sent:
            work.wait()
        tensors = message_tensors(msg, self.shapes, self.device)
        self.sent = [dist.isend(t, self.dst, tag=tag) for t, tag in zip(tensors, _TAGS, strict=True)]
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)

    def flush(self) -> None:
        for work in self.sent:
            work.wait()
        self.sent = []

    def receive(self) -> PendingMessage:
        """Post the receive of the next message (returns at once)."""
        tensors = empty_message_tensors(self.shapes, self.device)
        works = [dist.irecv(t, self.src, tag=tag) for t, tag in zip(tensors, _TAGS, strict=True)]
        return PendingMessage(tensors, works, self.shapes)


@dataclass
class PendingMessage:
    tensors: list[torch.Tensor]
    works: list[dist.Work]
    shapes: Shapes

    def wait(self) -> Message:
        for work in self.works:
            work.wait()
        return decode_message(*self.tensors, self.shapes)


def decode_message(header: torch.Tensor, latents: torch.Tensor, audio: torch.Tensor, speech: torch.Tensor,
                   shapes: Shapes) -> Message:
    h = header.tolist()
    if h[1]:
        return Message(None, None)
    n_speech = h[7]
    task = BlockTask(h[0], h[2], None, audio, tuple(h[_FIXED:_FIXED + shapes.steps]), bool(h[3]), h[4], (h[5], h[6]),
                     speech[:n_speech].cpu().numpy())
    return Message(task, latents)


@dataclass
class RankStats:
    """Where a rank's time went, per block (seconds), and what it sent."""

    busy: list[float] = field(default_factory=list)  # computing its steps (and decoding)
    waiting: list[float] = field(default_factory=list)  # waiting for the block's message
    refresh_wait: float = 0.0  # waiting for the first clean latent before clip 1
    refresh_compute: float = 0.0  # its sink re-prefill
    bytes_sent: int = 0
    blocks: int = 0


class PipelineRank:
    """This rank's part of a pipelined generation."""

    def __init__(self, pipe, layout: ParallelLayout, role: Role, opts, height: int, width: int,
                 groups: dict[int, object], frontend: Frontend | None = None):
        self.pipe, self.layout, self.role, self.opts = pipe, layout, role, opts
        self.device = pipe.device
        cfg = pipe.preset.dit
        self.schedule = make_schedule(pipe.preset.sampler, opts.sample_steps)
        self.tokens = SinkLayout(height // 8, width // 8, cfg.zip_frame_buckets)
        self.blocks_per_clip = opts.infer_frames // (4 * cfg.frames_per_block)
        self.groups, self.frontend = groups, frontend
        self.shapes = Shapes((1, cfg.in_dim, cfg.frames_per_block, height // 8, width // 8),
                             (1, pipe.preset.dit.audio_layers, cfg.audio_dim, 4 * cfg.frames_per_block),
                             4 * cfg.frames_per_block * 16000 // pipe.preset.fps + 1, len(self.schedule), pipe.dtype)
        self.stage = None
        if role.stage is not None:
            self.stage = DenoiseStage(pipe.dit, self.schedule, role.steps, self.tokens, self.device, pipe.dtype,
                                      pipe.runtime, heads=cfg.num_heads // layout.ulysses)
        self.decode = DecodeStage(pipe.vae, self.device) if role.decodes else None
        self.stats = RankStats()
        last = layout.stages - 1
        self.last_leader = last * layout.ulysses
        self.is_last_stage = role.stage == last
        self.inbox = None  # the link this rank receives blocks on
        self.outbox = None  # the link it sends them on
        if role.leader and role.stage > 0:
            self.inbox = Link((role.stage - 1) * layout.ulysses, role.rank, self.shapes, self.device)
        if role.decodes and role.stage is None:
            self.inbox = Link(self.last_leader, role.rank, self.shapes, self.device)
        if role.leader and not role.decodes:
            nxt = (role.stage + 1) * layout.ulysses if role.stage < last else layout.decoder
            self.outbox = Link(role.rank, nxt, self.shapes, self.device)

    # -- setup -------------------------------------------------------------------------------------

    def start(self, cond: Conditioning) -> None:
        """Prefill this rank's sink and prime its decoder with the conditioning every rank received."""
        if self.stage is not None:
            self.stage.start(cond.text, cond.ref_latent, cond.motion_latents)
        if self.decode is not None:
            self.decode.start(cond.motion_latents)
        self.refresh = None
        if self.stage is not None and not self.is_last_stage and self.opts.sink_refresh:
            self.refresh = torch.empty(self.shapes.latents[:2] + (1,) + self.shapes.latents[3:],
                                       dtype=self.pipe.dtype, device=self.device)
            self.refresh_work = dist.irecv(self.refresh, self.last_leader, tag=TAG_REFRESH)

    # -- the loop ----------------------------------------------------------------------------------

    def _next_message(self, pending: PendingMessage | None) -> tuple[Message, PendingMessage | None]:
        """(this block's message, the receive posted for the next one)."""
        msg = None  # a group member's: the broadcast brings it
        if self.role.frontend:
            task = self._next_task()
            msg = Message(task, task.noise if task is not None else None)
        elif pending is not None:
            msg = pending.wait()
            pending = self.inbox.receive() if not msg.stop else None  # overlaps this block's compute
        if self.role.stage is not None and self.layout.ulysses > 1:
            msg = self._group_broadcast(msg)
        return msg, pending

    def _next_task(self) -> BlockTask | None:
        fe = self.frontend
        while (ready := fe.ready()) is None:
            fe.wait()
        return fe.take() if ready else None

    def _group_broadcast(self, msg: Message | None) -> Message:
        """The stage's first rank shares the block's message with its group."""
        group = self.groups[self.role.stage]
        leader = self.role.stage * self.layout.ulysses
        sh = self.shapes
        tensors = message_tensors(msg, sh, self.device) if self.role.leader else empty_message_tensors(sh, self.device)
        for t in tensors:
            dist.broadcast(t, leader, group=group)
        return msg if self.role.leader else decode_message(*tensors, sh)

    def run(self, emit: Callable[[Chunk], None] | None = None) -> RankStats:
        """Process every block; the decoding rank hands each chunk to `emit`."""
        pending = self.inbox.receive() if self.inbox is not None else None
        first_sent = False
        while True:
            t0 = time.perf_counter()
            msg, pending = self._next_message(pending)
            self.stats.waiting.append(time.perf_counter() - t0)
            if msg.stop:
                if self.outbox is not None:
                    self.outbox.send(msg)
                break
            t1 = time.perf_counter()
            z = msg.latents
            if self.stage is not None:
                if msg.task.refresh_sink:
                    self._refresh()
                    t1 = time.perf_counter()
                z = self.stage(msg.task, z)
                if msg.task.index == 0 and self.is_last_stage and self.opts.sink_refresh:
                    self.first_latent = z[:, :, :1].clone()
                    if self.role.leader and not first_sent:
                        self._send_refresh(self.first_latent)
                        first_sent = True
            if self.decode is not None:
                chunk = output_chunk(msg.task, self.decode(z))
                if chunk is not None and emit is not None:
                    emit(chunk)
            elif self.outbox is not None:
                self.outbox.send(Message(msg.task, z))
            self.stats.busy.append(time.perf_counter() - t1)
            self.stats.blocks += 1
        if self.outbox is not None:
            self.outbox.flush()
            self.stats.bytes_sent = self.outbox.bytes_sent
        return self.stats

    def _refresh(self) -> None:
        """The sink refresh event: re-prefill this rank's sink with the first clean latent."""
        t0 = time.perf_counter()
        if self.refresh is not None:
            self.refresh_work.wait()
            first = self.refresh
        else:
            first = self.first_latent
        t1 = time.perf_counter()
        self.stage.refresh(first)
        self.stats.refresh_wait, self.stats.refresh_compute = t1 - t0, time.perf_counter() - t1

    def _send_refresh(self, first: torch.Tensor) -> None:
        """The last stage's first rank: the first clean latent to every denoise rank of the other stages."""
        others = [r for r in range(self.layout.denoise_ranks) if r // self.layout.ulysses != self.role.stage]
        self.refresh_sends = [dist.isend(first.contiguous(), r, tag=TAG_REFRESH) for r in others]

    def close(self) -> None:
        for work in getattr(self, "refresh_sends", []):
            work.wait()
        if self.stage is not None:
            self.stage.close()
        if self.decode is not None:
            self.decode.close()


__all__ = ["Link", "Message", "PipelineRank", "RankStats", "Shapes"]
