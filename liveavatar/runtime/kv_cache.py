"""Explicit key/value caches of the streaming DiT, and the attention contexts that read and write them.

`RingKVCache`: one per denoising step. Per layer it holds `ring_frames` latent frames of roped keys
and values (the current block plus the previous ones), written block-slot-wise at
slot = (F0 mod ring_frames)·fs. Step i's cache is only ever read and written by step i's forwards
("timestep forcing"), so each cache can live on its own device or in host memory
(`HostRingKVCache`, staged one layer at a time) or in FP8 (`FP8RingKVCache`).

`SinkCache`: the reference-image + FramePack motion tokens, computed once by the t = 0 prefill and
stored per layer **before** RoPE (keys are re-roped on every call with the rolling reference
position). It is sized exactly for the latent size (`liveavatar.models.layout.SinkLayout`; the
official code allocates a fixed 2,800 or 3,000 tokens, which caps the output area).

The DiT reaches the caches only through an attention context, one object per forward that its
self-attention calls once per layer as `keys, values = ctx.kv(layer, k, k_roped, v)`:
`SinkPrefill` stores the prefill's pre-RoPE keys and values in the sink; `BlockAttention` writes a
block's roped keys and values into its step's ring at a slot and returns the active ring tokens
followed by the sink keys re-roped at the rolled reference position. The caller (the denoise stage)
computes slot, active length and RoPE tables, and ends the forward with `finish()`.

All of these are plain tensors with known shapes, so `nbytes` can be computed before allocating
anything (`RingKVCache.bytes_for`, `SinkCache.bytes_for`); the memory planner uses those same
functions.
"""

from __future__ import annotations

import math
import weakref

import torch

from liveavatar.config import DiTConfig
from liveavatar.models.layout import SinkLayout
from liveavatar.models.rope import apply_rope


def _kv_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a K and a V tensor of `shape`."""
    return 2 * math.prod(shape) * dtype.itemsize


def _zeros_kv(shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


class RingKVCache:
    """Per-step ring of roped K and V: k, v [num_layers, B, ring_frames·fs, N, d]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, fs: int, ring_frames: int):
        self.k, self.v, self.fs, self.ring_frames = k, v, fs, ring_frames

    @staticmethod
    def shape_for(cfg: DiTConfig, fs: int, batch: int = 1, heads: int | None = None) -> tuple[int, ...]:
        """`heads`: the heads this cache holds (all of them, or a sequence-parallel rank's share)."""
        return (cfg.num_layers, batch, cfg.ring_frames * fs, heads or cfg.num_heads, cfg.head_dim)

    @classmethod
    def bytes_for(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, batch: int = 1, heads: int | None = None) -> int:
        return _kv_bytes(RingKVCache.shape_for(cfg, fs, batch, heads), dtype)

    @classmethod
    def allocate(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, device="cpu", batch: int = 1,
                 heads: int | None = None):
        return cls(*_zeros_kv(cls.shape_for(cfg, fs, batch, heads), dtype, device), fs, cfg.ring_frames)

    @property
    def ring_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def device_nbytes(self) -> int:
        """Bytes this cache occupies on the compute device."""
        return self.nbytes

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's ring K and V, [B, ring_len, N, d], on the compute device (written in place)."""
        return self.k[i], self.v[i]

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store layer i's roped keys and values k, v: [B, n, N, d] at ring tokens [start, start + n)."""
        kk, vv = self.layer(i)
        kk[:, start:start + k.shape[1]] = k
        vv[:, start:start + v.shape[1]] = v

    def read(self, i: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values of ring tokens [0, end), in the compute dtype: [B, end, N, d]."""
        kk, vv = self.layer(i)
        return kk[:, :end], vv[:, :end]

    def flush(self) -> None:
        """The forward is done: pending write-backs are issued. Nothing to do when resident."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The cache's contents by name (what a saved session stores); `load` copies them back."""
        self.flush()
        return {"k": self.k, "v": self.v}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in self.tensors().items():
            t.copy_(tensors[name])

    def close(self) -> None:
        """Release the storage now (the object must not be used afterwards)."""
        self.k = self.v = None


class FP8RingKVCache(RingKVCache):
    """A device-resident ring cache stored in float8 e4m3 with one fp32 scale per token and head
    (amax over the head dimension / 448): about half the bytes of bf16. Values are quantised when
    written and dequantised to the compute dtype when read; the same interface as `RingKVCache`."""

    def __init__(self, k, v, k_scale, v_scale, fs: int, ring_frames: int, dtype: torch.dtype):
        super().__init__(k, v, fs, ring_frames)
        self.k_scale, self.v_scale, self.dtype = k_scale, v_scale, dtype

    @classmethod
    def bytes_for(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype = torch.bfloat16, batch: int = 1,
                  heads: int | None = None) -> int:
        shape = cls.shape_for(cfg, fs, batch, heads)
        return _kv_bytes(shape, torch.float8_e4m3fn) + _kv_bytes((*shape[:-1], 1), torch.float32)

    @classmethod
    def allocate(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, device="cpu", batch: int = 1,
                 heads: int | None = None):
        shape = cls.shape_for(cfg, fs, batch, heads)
        k, v = _zeros_kv(shape, torch.float8_e4m3fn, device)
        ks, vs = _zeros_kv((*shape[:-1], 1), torch.float32, device)
        return cls(k, v, ks, vs, fs, cfg.ring_frames, dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.k_scale.nbytes + self.v_scale.nbytes

    def layer(self, i: int):
        raise TypeError("an FP8 ring cache is accessed through write() and read()")

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        for src, dst, scale in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            s = src.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0  # [B, n, N, 1]
            dst[i, :, start:start + n] = (src.float() / s).to(torch.float8_e4m3fn)
            scale[i, :, start:start + n] = s

    def read(self, i: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = (self.k[i, :, :end].float() * self.k_scale[i, :, :end]).to(self.dtype)
        v = (self.v[i, :, :end].float() * self.v_scale[i, :, :end]).to(self.dtype)
        return k, v

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "k_scale": self.k_scale, "v_scale": self.v_scale}

    def close(self) -> None:
        super().close()
        self.k_scale = self.v_scale = None


class HostRingKVCache(RingKVCache):
    """A ring cache kept in (pinned) host memory and staged one layer at a time through two device
    slots: layer i+1 is copied in on a side stream while layer i computes, and only the tokens a
    block writes go back, once the next layer is requested (by then the layer's attention has been
    issued) or at `flush()`. Same interface and the same numbers as a resident `RingKVCache`; device
    memory is two layers' K and V instead of all of them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, fs: int, ring_frames: int, device):
        super().__init__(k, v, fs, ring_frames)
        self.device = torch.device(device)
        shape = (2, 2, *k.shape[1:])  # [slot, k/v, B, T, N, d]
        self.slots = torch.empty(shape, dtype=k.dtype, device=self.device)
        self.loaded: list[int | None] = [None, None]
        self.pending: tuple[int, int, int] | None = None  # (layer, start, end) written, not yet copied back
        self._release = None  # unregisters the page-locked host copy (see allocate)
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]
        else:
            self.stream = None

    @staticmethod
    def device_bytes_for(cfg: DiTConfig, fs: int, dtype: torch.dtype, batch: int = 1, heads: int | None = None) -> int:
        return 2 * RingKVCache.bytes_for(cfg, fs, dtype, batch, heads) // cfg.num_layers

    @classmethod
    def allocate(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, device="cpu", batch: int = 1,
                 heads: int | None = None):
        host = "meta" if torch.device(device).type == "meta" else "cpu"  # sizes only, on meta
        k, v = _zeros_kv(cls.shape_for(cfg, fs, batch, heads), dtype, host)
        cache = cls(k, v, fs, cfg.ring_frames, device)
        if cache.device.type == "cuda":
            # Page-locked in place at their exact size (`pin_memory()` would round each up to a power of 2).
            from liveavatar.runtime.offload import pin_in_place, unpin

            cache.k, cache.v = pin_in_place(k), pin_in_place(v)
            registered = [t for t, orig in ((cache.k, k), (cache.v, v)) if t is orig]
            # Unregistered when closed, or when collected unclosed: after the side stream's copies end.
            cache._release = weakref.finalize(cache, unpin, registered, cache.stream)
        return cache

    @property
    def device_nbytes(self) -> int:
        return self.slots.nbytes

    def _fetch(self, i: int) -> None:
        s = i % 2
        if self.loaded[s] == i:
            return
        self.loaded[s] = i
        if self.stream is None:
            self.slots[s, 0].copy_(self.k[i])
            self.slots[s, 1].copy_(self.v[i])
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[s])  # the slot's previous layer is done and written back
            self.slots[s, 0].copy_(self.k[i], non_blocking=True)
            self.slots[s, 1].copy_(self.v[i], non_blocking=True)
            self.ready[s].record(self.stream)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending is not None and self.pending[0] != i:
            self.flush()  # the previous layer's attention has been issued: copy its new tokens back
        self._fetch(i)
        s = i % 2
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])
        if i + 1 < self.k.shape[0]:
            self._fetch(i + 1)  # overlaps layer i's compute
        return self.slots[s, 0], self.slots[s, 1]

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        super().write(i, start, k, v)
        self.pending = (i, start, start + k.shape[1])

    def flush(self) -> None:
        if self.pending is None:
            return
        i, start, end = self.pending
        self.pending = None
        s = i % 2
        if self.stream is None:
            self.k[i, :, start:end].copy_(self.slots[s, 0, :, start:end])
            self.v[i, :, start:end].copy_(self.slots[s, 1, :, start:end])
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(done)
            self.k[i, :, start:end].copy_(self.slots[s, 0, :, start:end], non_blocking=True)
            self.v[i, :, start:end].copy_(self.slots[s, 1, :, start:end], non_blocking=True)
            self.free[s].record(self.stream)
        # The slot holds a stale copy of layer i from now on only if another layer reuses it; a later
        # call for the same layer re-fetches (the host copy is the truth).
        self.loaded[s] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        self.flush()
        if self.stream is not None:
            self.stream.synchronize()  # the host copy is complete
        return {"k": self.k, "v": self.v}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load(tensors)
        self.loaded = [None, None]  # the device slots no longer match the host copy

    def close(self) -> None:
        """Wait for every copy still in flight on the side stream, then unpin and drop the host memory."""
        if self.k is None:
            return
        self.flush()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).synchronize()  # nothing reads the slots any more
        if self._release is not None:
            self._release()  # waits for the side stream, then unregisters
        elif self.stream is not None:
            self.stream.synchronize()
        super().close()
        self.slots = None


class SinkCache:
    """Sink K (pre-RoPE) and V per layer: k, v [num_layers, B, num_tokens, N, d]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, layout: SinkLayout):
        self.k, self.v, self.layout = k, v, layout

    @staticmethod
    def shape_for(cfg: DiTConfig, layout: SinkLayout, batch: int = 1, heads: int | None = None) -> tuple[int, ...]:
        return (cfg.num_layers, batch, layout.num_tokens, heads or cfg.num_heads, cfg.head_dim)

    @classmethod
    def bytes_for(cls, cfg: DiTConfig, layout: SinkLayout, dtype: torch.dtype, batch: int = 1,
                  heads: int | None = None) -> int:
        return _kv_bytes(cls.shape_for(cfg, layout, batch, heads), dtype)

    @classmethod
    def allocate(cls, cfg: DiTConfig, layout: SinkLayout, dtype: torch.dtype, device="cpu", batch: int = 1,
                 heads: int | None = None):
        return cls(*_zeros_kv(cls.shape_for(cfg, layout, batch, heads), dtype, device), layout)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.k.copy_(tensors["k"])
        self.v.copy_(tensors["v"])

    def close(self) -> None:
        self.k = self.v = None


class SinkPrefill:
    """Attention context of the sink prefill: each layer's keys (before RoPE) and values go into the
    sink cache; the prefill tokens attend to themselves. `rope`: cos/sin [num_tokens, d/2] of the sink
    tokens at the prefill reference position, on the compute device."""

    def __init__(self, sink: SinkCache, rope: tuple[torch.Tensor, torch.Tensor]):
        self.sink, self.rope = sink, rope

    def kv(self, layer: int, k: torch.Tensor, k_roped: torch.Tensor, v: torch.Tensor):
        self.sink.k[layer].copy_(k)
        self.sink.v[layer].copy_(v)
        return k_roped, v

    def finish(self) -> None:
        pass


class BlockAttention:
    """Attention context of one block forward at one denoising step.

    Writes the block's roped keys and values into `ring` at ring tokens [slot, slot + n) and returns,
    per layer, the ring tokens [0, active) followed by the sink keys re-roped with `sink_rope` (the
    rolled reference position) and the sink values. `rope`: cos/sin [n, d/2] of the block's tokens;
    all tables on the compute device."""

    def __init__(self, ring: RingKVCache, sink: SinkCache, rope: tuple[torch.Tensor, torch.Tensor],
                 sink_rope: tuple[torch.Tensor, torch.Tensor], slot: int, active: int):
        self.ring, self.sink, self.rope, self.sink_rope = ring, sink, rope, sink_rope
        self.slot, self.active = slot, active

    def kv(self, layer: int, k: torch.Tensor, k_roped: torch.Tensor, v: torch.Tensor):
        self.ring.write(layer, self.slot, k_roped, v)
        rk, rv = self.ring.read(layer, self.active)  # [B, active, N, d]
        sk = apply_rope(self.sink.k[layer], *self.sink_rope)
        return torch.cat([rk, sk], dim=1), torch.cat([rv, self.sink.v[layer]], dim=1)

    def finish(self) -> None:
        """The forward is done: the ring's last write is committed."""
        self.ring.flush()
