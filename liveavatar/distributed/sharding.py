"""Sharded DiT weights inside a sequence-parallel group: each rank holds 1/G of every block.

`apply_sharded_weights(model, group, device)` packs each transformer block (with the audio injector
that runs after it) into one flat byte buffer, as block streaming does (`liveavatar.runtime.offload`),
and keeps only this rank's 1/G slice of it on the device. Before a block runs, its bytes are
all-gathered from the group into one of two device slots; the next block's gather is issued while the
current one computes. The parameters are typed views into the slots, so FP8 weights, their scales and
the bf16 biases travel in the same gather (byte-level: any dtype, any backend). Everything outside the
blocks (embeddings, head, audio encoder, ...) stays whole on every rank.

Memory per rank: the shards (1/G of the blocks) + two unsharded block slots (the "unshard" spike and
the prefetch buffer) + the rest of the model. The planner counts exactly these bytes.

Only ranks that run the same forwards at the same time may share weights this way (a sequence-parallel
group): every rank of the group must enter every block in the same order, or the gathers deadlock.
FSDP2's `fully_shard` is not used: it refuses modules mixing parameter dtypes, which every FP8 block
does (e4m3 weights, float32 scales, bf16 biases), and inference needs none of its gradient machinery.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from liveavatar.runtime.offload import ALIGN, BlockStreamer

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


class ShardedBlocks(BlockStreamer):
    source_on_host = False

    def __init__(self, model: nn.Module, device, group=None):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.pad_to = self.size * ALIGN  # every rank's slice is aligned
        self.works: dict[int, dist.Work] = {}
        super().__init__(model, resident=0, device=device, pin_memory=False)

    def _make_source(self, flat: torch.Tensor, pin: bool, registered: list[torch.Tensor]) -> torch.Tensor:
        n = flat.numel() // self.size
        return flat[self.rank * n:(self.rank + 1) * n].to(self.device, copy=True)

    def _load(self, g) -> None:
        s = g.slot
        self.works[s] = _all_gather(self.slots[s][: g.nbytes], g.source, group=self.group, async_op=True)
        self.loaded[s] = g.index

    def _wait(self, s: int) -> None:
        work = self.works.pop(s, None)
        if work is not None:
            work.wait()  # on CUDA: the compute stream waits for the gather; on the CPU: the host does


def sharded_nbytes(group_bytes: list[int], size: int) -> tuple[int, int]:
    """(one rank's shards, its two slots) in bytes for blocks whose flat buffers have `group_bytes`
    (`liveavatar.runtime.offload.group_nbytes`), sharded over `size` ranks: what `ShardedBlocks`
    allocates."""
    padded = [-(-n // (size * ALIGN)) * size * ALIGN for n in group_bytes]
    return sum(padded) // size, min(2, len(padded)) * max(padded, default=0)


def apply_sharded_weights(model: nn.Module, group=None, device="cpu") -> ShardedBlocks:
    """Shard `model`'s transformer blocks over `group` (see the module docstring). Apply after the LoRA
    merge and `apply_fp8`, on a model whose weights are loaded (in host memory), on every rank of the
    group at the same time; do not move the model afterwards."""
    return ShardedBlocks(model, device, group)


__all__ = ["ShardedBlocks", "apply_sharded_weights", "sharded_nbytes"]
