"""`apply_compile`: every transformer block of a built DiT compiled whole with `torch.compile`.

As torchtitan does, the unit of compilation is the transformer block, not the model: a block's
forward (self-attention against its layer's `LayerKV`, text cross-attention, FFN) is one graph with
`fullgraph=True`, and the graph is shared by every layer (the weights are graph inputs) and reused
at every block: the layer's key/value buffers, the ring slot (a device index tensor) and the RoPE
tables are tensors of the same shapes at every call, so nothing recompiles. There are two graphs,
each traced once: the ring filling (the first `ring_frames / frames_per_block` blocks, attending
through a key mask) and the steady state (the whole ring and sink, no mask). The sink prefill
(once per session and per refresh, on a different token count) and attention contexts that are not
static run eagerly. The audio injection, head and embeddings between blocks stay eager.

The denoise stage sees a compiled DiT (`is_compiled`) and builds static attention contexts for it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from liveavatar.runtime.kv_cache import LayerKV


def _steady(block, x, e0, text_kv, cache, frames):
    return type(block).forward(block, x, e0, text_kv, cache, frames)


def _filling(block, x, e0, text_kv, cache, frames):  # same body: its own code object, its own graph
    return type(block).forward(block, x, e0, text_kv, cache, frames)


class CompiledBlockForward:
    """A block's forward: the compiled graph for static attention contexts, eager otherwise."""

    def __init__(self, block: nn.Module, steady, filling):
        self.block, self.steady, self.filling = block, steady, filling
        self.eager = type(block).forward.__get__(block)

    def __call__(self, x, e0, text_kv, cache, frames: int, skip_tail: bool = False):
        if skip_tail or not isinstance(cache, LayerKV) or cache.active is not None:
            return self.eager(x, e0, text_kv, cache, frames, skip_tail)
        fn = self.steady if cache.mask is None else self.filling
        try:
            return fn(self.block, x, e0, text_kv, cache, frames)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # More shapes than dynamo keeps graphs for (a server seeing many video sizes): raised before
            # the graph runs, so nothing was computed; this shape runs eagerly, the others stay compiled.
            _warn_once()
            return self.eager(x, e0, text_kv, cache, frames, skip_tail)


_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        import sys

        _warned = True
        print(f"warning: more video sizes than torch.compile keeps graphs for "
              f"({torch._dynamo.config.recompile_limit}); blocks of further sizes run uncompiled", file=sys.stderr)


def apply_compile(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """Compile each block of `model` (`fullgraph=True`) in place; `backend`, `mode`: as `torch.compile`
    takes them (e.g. "reduce-overhead" for CUDA graphs). Returns `model`."""
    # dynamic=False: each video size gets its own static graphs (a server whose sessions ask for
    # several sizes compiles each size once) rather than one symbolic-shape graph after the second.
    steady = torch.compile(_steady, fullgraph=True, dynamic=False, backend=backend, mode=mode)
    filling = torch.compile(_filling, fullgraph=True, dynamic=False, backend=backend, mode=mode)
    for block in model.blocks:
        block.forward = CompiledBlockForward(block, steady, filling)
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `apply_compile` was applied to `model`."""
    blocks = getattr(model, "blocks", None)
    return bool(blocks) and isinstance(blocks[0].__dict__.get("forward"), CompiledBlockForward)


__all__ = ["CompiledBlockForward", "apply_compile", "is_compiled"]
