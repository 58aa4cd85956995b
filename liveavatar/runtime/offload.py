"""Block streaming of the DiT's weights: K groups resident on the device, the rest streamed from host.

A *group* is one transformer block plus the audio injector (cross-attention + AdaLN) that runs right
after it (`cfg.audio_inject_layers`), so the 1.9 B injector parameters travel with their block.
`apply_block_streaming(model, resident=K, device)` keeps the first K groups and everything outside
the blocks (embeddings, head, audio encoder, ...) on `device`. Each other group is packed once into
one flat byte buffer in host memory (page-locked when CUDA is used; FP8, fp32 and bf16 tensors side
by side at 256-byte aligned offsets), and its parameters become typed views into one of two
preallocated device slots (groups alternate slots). Forward pre-hooks on the blocks move the
weights: before block i runs, the compute stream waits for the event "group i copied"; the copy of
the next streamed group into the other slot is issued on a side stream behind an event recorded on
the compute stream after everything that reads that slot (the previous group, its injector
included). No host synchronisation happens per block and device addresses never change, so nothing
stops a CUDA-graph capture of the schedule (call `join()` before ending one; not yet exercised on a
GPU). The ring wraps across forwards: the last groups prefetch the first (with an odd number of
streamed groups the first one shares the last one's slot and is fetched once the resident blocks
start, or unoverlapped when none is resident). On a CPU "device" the same code runs with
synchronous copies, which is what the unit tests compare against the resident model.
Inference only: autograd would keep views of slots that are later overwritten.

This follows the two-static-buffers + side-stream + events design of LightX2V (ecosystem.md §2.3)
with weights kept inside the `nn.Module`, so FP8 (`liveavatar.runtime.fp8`) and streaming compose.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from liveavatar.errors import UserError

ALIGN = 256  # byte alignment of every tensor inside a flat buffer (cudaMalloc's; ≥ any vector load)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def stream_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Module names of each streaming group, in execution order: `blocks.i` [+ its audio injector]."""
    inject = {layer: j for j, layer in enumerate(model.cfg.audio_inject_layers)}
    groups = []
    for i in range(len(model.blocks)):
        names = (f"blocks.{i}",)
        if i in inject:
            j = inject[i]
            names += (f"audio_injector.injector.{j}", f"audio_injector.injector_adain_layers.{j}")
        groups.append(names)
    return groups


@dataclass
class _Entry:
    owner: nn.Module
    attr: str
    is_param: bool
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def _tensor(e: _Entry) -> torch.Tensor:
    return e.owner._parameters[e.attr] if e.is_param else e.owner._buffers[e.attr]


def _group_entries(model: nn.Module, names: Sequence[str]) -> tuple[list[_Entry], int]:
    """Every parameter and buffer of the named modules with its offset in the group's flat buffer."""
    entries, seen, offset = [], set(), 0
    for name in names:
        for module in model.get_submodule(name).modules():
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for attr, t in table.items():
                    if t is None or id(t) in seen:
                        continue
                    seen.add(id(t))
                    nbytes = t.numel() * t.element_size()
                    entries.append(_Entry(module, attr, is_param, offset, t.dtype, tuple(t.shape), nbytes))
                    offset = _align(offset + nbytes)
    return entries, offset


def group_nbytes(model: nn.Module) -> list[int]:
    """Bytes of each group's flat buffer (aligned), from shapes alone (works on meta)."""
    return [_group_entries(model, names)[1] for names in stream_groups(model)]


def base_nbytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers outside every group (always resident)."""
    in_groups = {id(_tensor(e)) for names in stream_groups(model) for e in _group_entries(model, names)[0]}
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in in_groups)


def choose_resident_blocks(budget_bytes: int, group_bytes: Sequence[int], base_bytes: int) -> int:
    """The largest K such that base + the first K groups + two slots for the rest fit `budget_bytes`.

    group_bytes: `group_nbytes(model)`; base_bytes: `base_nbytes(model)` (same model, on meta is fine)."""
    n = len(group_bytes)
    for k in range(n, -1, -1):
        rest = group_bytes[k:]
        need = base_bytes + sum(group_bytes[:k]) + min(2, len(rest)) * max(rest, default=0)
        if need <= budget_bytes:
            return k
    need = base_bytes + 2 * max(group_bytes, default=0)
    raise UserError(f"a weight budget of {budget_bytes / 2**30:.2f} GiB cannot hold the DiT even with every block "
                    f"streamed ({need / 2**30:.2f} GiB needed); raise the budget or use FP8 weights")


def pin_in_place(t: torch.Tensor) -> torch.Tensor:
    """Page-lock a CPU tensor in place. `cudaHostRegister` keeps the exact size (the caching pinned
    allocator behind `pin_memory()` rounds each allocation up to a power of two); falls back to a copy."""
    try:
        cudart = torch.cuda.cudart()
        if cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0) == cudart.cudaError.success:
            return t
    except (AttributeError, RuntimeError):
        pass
    return t.pin_memory()


def unpin(registered: list[torch.Tensor], stream=None) -> None:
    """Unregister page-locked host tensors, after every copy queued on `stream` (if given) has ended."""
    if stream is not None:
        stream.synchronize()
    cudart = torch.cuda.cudart()
    for t in registered:
        cudart.cudaHostUnregister(t.data_ptr())


@dataclass
class _Group:
    index: int  # block index
    names: tuple[str, ...]
    entries: list[_Entry]
    nbytes: int
    slot: int | None = None  # None: resident
    source: torch.Tensor | None = None  # uint8: where a streamed group's bytes come from (host buffer, shard)
    next: _Group | None = field(default=None, repr=False)  # next streamed group in (cyclic) execution order


class BlockStreamer:
    """The state of block streaming for one model: host buffers, two device slots, side stream, events.

    Built by `apply_block_streaming`; lives as long as the model (its hooks hold it). Subclasses change
    where the streamed bytes come from (`_make_source`, `_load`, `_wait`): sharded weights gather
    them from the ranks of a group instead of host memory."""

    pad_to = ALIGN  # each group's flat buffer is a multiple of this many bytes

    def __init__(self, model: nn.Module, resident: int, device, pin_memory: bool | None = None):
        device = torch.device(device)
        names = stream_groups(model)
        if not 0 <= resident <= len(names):
            raise UserError(f"resident blocks must be between 0 and {len(names)}, got {resident}")
        if any(t.is_meta for t in model.parameters()):
            raise UserError("block streaming needs a model with loaded weights, not a meta model; load it first")
        self.device, self.resident = device, resident
        self.groups = [_Group(i, n, *_group_entries(model, n)) for i, n in enumerate(names)]
        self.streamed = self.groups[resident:]
        pin = device.type == "cuda" if pin_memory is None else pin_memory
        registered: list[torch.Tensor] = []

        # Everything not streamed goes to the device.
        streamed_ids = {id(_tensor(e)) for g in self.streamed for e in g.entries}
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and id(p) not in streamed_ids:
                    p.data = p.data.to(device)
            for attr, b in module._buffers.items():
                if b is not None and id(b) not in streamed_ids:
                    module._buffers[attr] = b.to(device)

        n_slots = min(2, len(self.streamed))
        for g in self.streamed:
            g.nbytes = -(-g.nbytes // self.pad_to) * self.pad_to
        self.slot_nbytes = max((g.nbytes for g in self.streamed), default=0)
        self.slots = [torch.empty(self.slot_nbytes, dtype=torch.uint8, device=device) for _ in range(n_slots)]
        self.loaded: list[int | None] = [None] * n_slots  # block index whose copy was last issued per slot
        for k, g in enumerate(self.streamed):
            g.slot = k % n_slots
            flat = torch.zeros(g.nbytes, dtype=torch.uint8)
            for e in g.entries:
                self._view(flat, e).copy_(_tensor(e))
            g.source = self._make_source(flat, pin, registered)
            for e in g.entries:  # rebinding frees the original storage
                self._rebind(e, self._view(self.slots[g.slot], e))
        for i, g in enumerate(self.groups):
            later = [self.groups[(i + d) % len(self.groups)] for d in range(1, len(self.groups) + 1)]
            nxt = next((h for h in later if h.slot is not None), None)
            g.next = None if nxt is g else nxt

        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(n_slots)]  # "copy into slot s done"
            self.free = [torch.cuda.Event() for _ in range(n_slots)]  # "compute that read slot s enqueued"
        else:
            self.stream, self.ready, self.free = None, [], []
        if registered:
            weakref.finalize(self, unpin, registered, self.stream)
        for g in self.streamed[:n_slots]:  # first slots filled ahead of the first forward
            self._load(g)
        self.handles = [model.blocks[g.index].register_forward_pre_hook(self._hook(g)) for g in self.groups]

        # Byte accounting (the planner's numbers): the sources; device = resident tensors + slots (+ shards).
        resident = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        streamed_ids = {id(_tensor(e)) for g in self.streamed for e in g.entries}  # buffers were rebound
        self.nbytes_source = sum(g.source.numel() for g in self.streamed)
        self.nbytes_host = self.nbytes_source if self.source_on_host else 0
        self.nbytes_slots = sum(s.numel() for s in self.slots)
        self.nbytes_resident = sum(t.numel() * t.element_size() for k, t in resident.items() if k not in streamed_ids)
        on_device = 0 if self.source_on_host else self.nbytes_source
        self.nbytes_device = self.nbytes_resident + self.nbytes_slots + on_device

    source_on_host = True

    def _make_source(self, flat: torch.Tensor, pin: bool, registered: list[torch.Tensor]) -> torch.Tensor:
        """Where group bytes `flat` (host, uint8) are kept between uses: host memory, page-locked."""
        if not pin:
            return flat
        pinned = pin_in_place(flat)
        if pinned is flat:
            registered.append(flat)
        return pinned

    # ---- the schedule -----------------------------------------------------------------------

    def _hook(self, g: _Group):
        def pre_hook(module, args):
            self.before_block(g)
        return pre_hook

    def before_block(self, g: _Group) -> None:
        """Block g.index is about to be enqueued: make its weights ready, prefetch the next group."""
        if g.slot is not None:
            if self.loaded[g.slot] != g.index:  # not prefetched (first call, or an odd ring wrapping)
                self._load(g)
            self._wait(g.slot)
        n = g.next
        # The next group's slot is free once everything enqueued so far has run; never the current one.
        if n is not None and n.slot != g.slot and self.loaded[n.slot] != n.index:
            self._load(n)

    def _load(self, g: _Group) -> None:
        """Issue the copy of group g into its slot (after the slot's previous readers)."""
        s = g.slot
        dst = self.slots[s][: g.nbytes]
        if self.stream is None:
            dst.copy_(g.source)
        else:
            self.free[s].record(torch.cuda.current_stream(self.device))
            self.stream.wait_event(self.free[s])
            with torch.cuda.stream(self.stream):
                dst.copy_(g.source, non_blocking=True)
            self.ready[s].record(self.stream)
        self.loaded[s] = g.index

    def _wait(self, s: int) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])

    def join(self) -> None:
        """Make the compute stream wait for every issued copy (end of a CUDA-graph capture)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # ---- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _view(buf: torch.Tensor, e: _Entry) -> torch.Tensor:
        return buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)

    @staticmethod
    def _rebind(e: _Entry, view: torch.Tensor) -> None:
        if e.is_param:
            e.owner._parameters[e.attr].data = view
        else:
            e.owner._buffers[e.attr] = view


def apply_block_streaming(model: nn.Module, resident: int, device, pin_memory: bool | None = None) -> BlockStreamer:
    """Keep the first `resident` groups (block + its audio injector) and all non-block weights on
    `device`; stream the others from host memory through two device slots. Modifies `model` in
    place (apply after LoRA merge and `apply_fp8`; do not `.to()` the model afterwards) and returns
    the streaming state."""
    return BlockStreamer(model, resident, device, pin_memory)


__all__ = [
    "ALIGN", "BlockStreamer", "apply_block_streaming", "base_nbytes", "choose_resident_blocks", "group_nbytes",
    "pin_in_place", "stream_groups", "unpin",
]
