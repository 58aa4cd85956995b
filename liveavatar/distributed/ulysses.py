"""Ulysses sequence parallelism for the DiT: a group of G ranks runs one forward on 1/G of the tokens.

`apply_ulysses(model, group)` changes a built model in place:
- before the first transformer block, each rank keeps its share of the tokens: every latent frame's
  tokens are padded to a multiple of G and split in G equal runs, rank r keeping run r of every
  frame. Everything but self-attention works per token or per frame (modulation, FFN, the text
  cross-attention, the per-frame audio injection, the head), so it runs on the share unchanged;
- in every self-attention, q, k and v go through an all-to-all from "my tokens, all heads" to
  "all tokens, my heads" (G = the group size, which must divide the head count). The padding is
  dropped and the tokens are in their canonical order, so the attention context sees exactly what a
  single rank would, for N/G heads: the caches a rank holds have N/G heads (1/G of the memory). The
  output goes back through the inverse all-to-all;
- the head's output is all-gathered, so every rank of the group returns the whole velocity.

The sink prefill (one frame group) is split the same way. Token counts that do not divide by G (720×400
gives 1,125 tokens a frame) are padded and unpadded exactly; the padding never reaches attention.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn


class SequenceShards:
    """The current forward's token split over a group: F frames of P tokens, padded to P' = G·Pl."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.frames = self.per_frame = self.local = 0

    def shard(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: [B, F·P, D] (all tokens) -> [B, F·Pl, D] (this rank's run of each frame)."""
        b, seq, d = x.shape
        self.frames, self.per_frame = frames, seq // frames
        self.local = math.ceil(self.per_frame / self.size)
        x = self._pad(x.view(b, frames, self.per_frame, d))
        return x[:, :, self.rank * self.local:(self.rank + 1) * self.local].reshape(b, frames * self.local, d)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, P, ...] -> [B, F, G·Pl, ...] with zeros after each frame's tokens."""
        extra = self.size * self.local - x.shape[2]
        if extra == 0:
            return x
        pad = x.new_zeros(*x.shape[:2], extra, *x.shape[3:])
        return torch.cat([x, pad], dim=2)

    def seq_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, F·Pl, N, d] (my tokens, all heads) -> [B, F·P, N/G, d] (all tokens in order, my heads)."""
        b, _, n, d = t.shape
        g, f, pl = self.size, self.frames, self.local
        send = t.view(b, f, pl, g, n // g, d).permute(3, 0, 1, 2, 4, 5).contiguous()  # [G(to), B, F, Pl, N/G, d]
        recv = torch.empty_like(send)  # [G(from), B, F, Pl, N/G, d]
        dist.all_to_all_single(recv, send, group=self.group)
        full = recv.permute(1, 2, 0, 3, 4, 5).reshape(b, f, g * pl, n // g, d)  # run j of every frame from rank j
        return full[:, :, :self.per_frame].reshape(b, f * self.per_frame, n // g, d)

    def heads_to_seq(self, y: torch.Tensor) -> torch.Tensor:
        """[B, F·P, (N/G)·d] (all tokens, my heads) -> [B, F·Pl, N·d] (my tokens, all heads)."""
        b, _, hd = y.shape
        g, f, pl = self.size, self.frames, self.local
        y = self._pad(y.view(b, f, self.per_frame, hd))
        send = y.view(b, f, g, pl, hd).permute(2, 0, 1, 3, 4).contiguous()  # [G(to), B, F, Pl, hd]
        recv = torch.empty_like(send)  # [G(from: its heads), B, F, Pl, hd]
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 3, 0, 4).reshape(b, f * pl, g * hd)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """[B, F·Pl, C] per rank -> [B, F·P, C] on every rank (tokens in order, padding dropped)."""
        b, _, c = out.shape
        parts = [torch.empty_like(out) for _ in range(self.size)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        full = torch.stack(parts).view(self.size, b, self.frames, self.local, c)
        full = full.permute(1, 2, 0, 3, 4).reshape(b, self.frames, self.size * self.local, c)
        return full[:, :, :self.per_frame].reshape(b, self.frames * self.per_frame, c)


class _UlyssesAttend:
    """A block's self-attention core between the two all-to-alls."""

    def __init__(self, attend, shards: SequenceShards):
        self.attend, self.shards = attend, shards

    def __call__(self, q, k, v, cache):
        s = self.shards
        y = self.attend(s.seq_to_heads(q), s.seq_to_heads(k), s.seq_to_heads(v), cache)
        return s.heads_to_seq(y)


def apply_ulysses(model: nn.Module, group=None) -> SequenceShards:
    """Split `model`'s forwards over the ranks of `group` (see the module docstring); returns the
    shared split state. Every rank of the group must run the same forwards in the same order."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if model.cfg.num_heads % size:
        raise ValueError(f"{size} sequence-parallel ranks do not divide {model.cfg.num_heads} heads")
    shards = SequenceShards(group, size, rank)

    def shard_input(module, args, kwargs):
        x, *rest = args
        return (shards.shard(x, kwargs.get("frames", 1)), *rest), kwargs

    def gather_output(module, args, out):
        return shards.gather(out)

    model.blocks[0].register_forward_pre_hook(shard_input, with_kwargs=True)
    for block in model.blocks:
        block.self_attn.attend = _UlyssesAttend(block.self_attn.attend, shards)
    model.head.register_forward_hook(gather_output)
    return shards


__all__ = ["SequenceShards", "apply_ulysses"]
