"""Explicit key/value caches of the streaming DiT, and the attention contexts that read and write them.

`RingKVCache`: one per denoising step. Per layer it holds one contiguous key buffer and one value
buffer of `ring_frames` latent frames of roped tokens (the current block plus the previous ones),
written block-slot-wise at slot = (F0 mod ring_frames)·fs, **followed by the sink tokens**: the
sink keys re-roped for the current forward (written once per forward, layer by layer) and
the sink values (copied once per sink prefill). Attention reads one buffer per layer, never a
concatenation. Step i's cache is only ever read and written by step i's forwards ("timestep
forcing"), so each cache can live on its own device or in host memory (`HostRingKVCache`, staged
one layer at a time) or in FP8 (`FP8RingKVCache`); those two keep the ring part only and fill the
sink part of a device staging buffer per layer. `StagedRingKVCache` does the same for a resident
ring in the compute dtype (`--kv_sink shared`): the sink tokens are stored once (the sink cache) and
copied with the ring into one layer's staging buffer per forward, instead of once in every ring.

`SinkCache`: the reference-image + FramePack motion tokens, computed once by the t = 0 prefill and
stored per layer **before** RoPE (keys are re-roped on every call with the rolling reference
position). It is sized exactly for the latent size (`liveavatar.models.layout.SinkLayout`; the
official code allocates a fixed 2,800 or 3,000 tokens, which caps the output area).

The DiT reaches the caches only through an attention context, one object per forward:
`ctx.layer(i)` gives layer i's `LayerKV` (its key/value buffers, where the block writes, which keys
it attends to), the block's self-attention calls `keys, values = layer_kv.kv(k, k_roped, v)`, and
`ctx.done(i)` follows the block. `SinkPrefill` stores the prefill's pre-RoPE keys and values in the
sink; `BlockAttention` writes a block's roped keys and values into its step's ring at a slot and
attends to the ring tokens written so far and the re-roped sink. The caller (the denoise stage)
computes slot, active length and RoPE tables, and ends the forward with `finish()`.

A `LayerKV` holds tensors only (plus constants), and the ring slot is a device index tensor (one
per slot, made once), so a compiled block sees the same shapes at every layer, slot and block
(`liveavatar.runtime.compile`). While the ring fills (the first `ring_frames / frames_per_block`
blocks) the eager path attends to the written ring tokens and the sink through a concatenation
(as before); a context made with `static=True` attends to the whole buffer through a key mask.

All of these are plain tensors with known shapes, so `nbytes` can be computed before allocating
anything (`RingKVCache.bytes_for`, `SinkCache.bytes_for`); the memory planner uses those same
functions.
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch

from liveavatar.config import DiTConfig
from liveavatar.models.layout import SinkLayout
from liveavatar.models.rope import apply_rope

_stamps = itertools.count(1)  # a sink's contents are identified by a stamp, fresh at every change


def _kv_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a K and a V tensor of `shape`."""
    return 2 * math.prod(shape) * dtype.itemsize


def _zeros_kv(shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def _roped_sink_keys(sink: SinkCache, rope: tuple[torch.Tensor, torch.Tensor], layer: int) -> torch.Tensor:
    """The sink keys of one layer, [B, Ls, N, d], rotated by `rope`."""
    return apply_rope(sink.k[layer], *rope)


class LayerKV:
    """One layer's attention for one forward: its key and value buffers k, v [B, T, N, d] (ring tokens,
    then the sink), the ring tokens the block writes (`index`, [n] int64 on the device) and the keys
    it attends to: all T, or (`mask`, [T] bool) a masked subset (static shapes), or (`active`) the
    first `active` ring tokens and the sink, gathered (eager, while the ring fills)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, rope, ring_len: int,
                 mask: torch.Tensor | None = None, active: int | None = None):
        self.k, self.v, self.index, self.rope, self.ring_len = k, v, index, rope, ring_len
        self.mask, self.active = mask, active

    def kv(self, k: torch.Tensor, k_roped: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the block's roped keys and values k_roped, v: [B, n, N, d]; return the keys and values
        to attend to."""
        self.store(k_roped, v)
        if self.active is None:
            return self.k, self.v
        r = self.ring_len
        return (torch.cat([self.k[:, :self.active], self.k[:, r:]], dim=1),
                torch.cat([self.v[:, :self.active], self.v[:, r:]], dim=1))

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(1, self.index, k)
        self.v.index_copy_(1, self.index, v)


class FP8LayerKV(LayerKV):
    """A `LayerKV` over the device staging buffers of an FP8 ring: the block's keys and values are
    quantised into the ring's e4m3 storage, and the staging buffers get them dequantised (what any
    later read of the ring returns)."""

    def __init__(self, k, v, index, rope, ring_len, mask, active, quantized):
        super().__init__(k, v, index, rope, ring_len, mask, active)
        self.quantized = quantized  # layer's (k_fp8, v_fp8, k_scale, v_scale): [B, ring_len, N, d or 1]

    def store(self, k, v):
        qk, qv, sk, sv = self.quantized
        for src, dst, scale, buf in ((k, qk, sk, self.k), (v, qv, sv, self.v)):
            s = src.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0  # [B, n, N, 1]
            q = (src.float() / s).to(torch.float8_e4m3fn)
            dst.view(torch.uint8).index_copy_(1, self.index, q.view(torch.uint8))
            scale.index_copy_(1, self.index, s)
            buf.index_copy_(1, self.index, (q.float() * s).to(buf.dtype))


class StagedLayerKV(LayerKV):
    """A `LayerKV` over a device staging buffer: the block's keys and values go into the staging
    buffers (attended to) and into the ring's own storage `ring_kv` (layer's k, v [B, ring_len, N, d])."""

    def __init__(self, k, v, index, rope, ring_len, mask, active, ring_kv):
        super().__init__(k, v, index, rope, ring_len, mask, active)
        self.ring_kv = ring_kv

    def store(self, k, v):
        super().store(k, v)
        self.ring_kv[0].index_copy_(1, self.index, k)
        self.ring_kv[1].index_copy_(1, self.index, v)


class RingKVCache:
    """Per-step ring of roped K and V followed by the sink tokens: one buffer per layer,
    buf_k, buf_v [num_layers, B, ring_frames·fs + sink_tokens, N, d]; `k`, `v` are the ring parts
    [num_layers, B, ring_frames·fs, N, d] (views)."""

    staged = False  # True: the sink part lives in a device staging buffer filled per layer

    def __init__(self, k: torch.Tensor, v: torch.Tensor, fs: int, ring_frames: int):
        self.fs, self.ring_frames = fs, ring_frames
        self.buf_k, self.buf_v = k, v
        r = fs * ring_frames
        self.k, self.v = k[:, :, :r], v[:, :, :r]
        self.sink_stamp = None  # the stamp of the sink whose values the buffers hold
        self._index: dict[tuple[int, int], torch.Tensor] = {}
        self._mask: dict[int, torch.Tensor] = {}

    @staticmethod
    def shape_for(cfg: DiTConfig, fs: int, batch: int = 1, heads: int | None = None,
                  sink_tokens: int = 0) -> tuple[int, ...]:
        """`heads`: the heads this cache holds (all of them, or a sequence-parallel rank's share);
        `sink_tokens`: the sink tokens stored after the ring in each layer's buffer."""
        return (cfg.num_layers, batch, cfg.ring_frames * fs + sink_tokens, heads or cfg.num_heads, cfg.head_dim)

    @classmethod
    def bytes_for(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, batch: int = 1, heads: int | None = None,
                  sink_tokens: int = 0) -> int:
        return _kv_bytes(RingKVCache.shape_for(cfg, fs, batch, heads, sink_tokens), dtype)

    @classmethod
    def allocate(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, device="cpu", batch: int = 1,
                 heads: int | None = None, sink_tokens: int = 0):
        return cls(*_zeros_kv(cls.shape_for(cfg, fs, batch, heads, sink_tokens), dtype, device), fs, cfg.ring_frames)

    @property
    def ring_len(self) -> int:
        return self.fs * self.ring_frames

    @property
    def sink_tokens(self) -> int:
        return self.buf_k.shape[2] - self.ring_len

    @property
    def nbytes(self) -> int:
        return self.buf_k.nbytes + self.buf_v.nbytes

    @property
    def device_nbytes(self) -> int:
        """Bytes this cache occupies on the compute device."""
        return self.nbytes

    @property
    def device(self) -> torch.device:
        return self.buf_k.device

    def token_index(self, start: int, n: int) -> torch.Tensor:
        """Ring tokens [start, start + n) as an int64 device tensor (made once per slot)."""
        if (start, n) not in self._index:
            self._index[start, n] = torch.arange(start, start + n, device=self.device)
        return self._index[start, n]

    def key_mask(self, active: int) -> torch.Tensor:
        """[ring_len + sink_tokens] bool: the first `active` ring tokens and the sink (made once per length)."""
        if active not in self._mask:
            pos = torch.arange(self.ring_len + self.sink_tokens, device=self.device)
            self._mask[active] = (pos < active) | (pos >= self.ring_len)
        return self._mask[active]

    def set_sink(self, sink: SinkCache, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Before a forward: the sink keys re-roped with `rope` and, when the sink changed since, its
        values. Layer by layer: the rotation's float32 copies of all 40 layers' sink keys would be
        several GB at 704x384 (one layer's are in the block workspace the planner counts)."""
        if self.sink_tokens != sink.layout.num_tokens:
            raise ValueError(f"this ring holds {self.sink_tokens} sink tokens, the sink has {sink.layout.num_tokens}")
        for i in range(self.buf_k.shape[0]):
            self.buf_k[i, :, self.ring_len:] = _roped_sink_keys(sink, rope, i)
        if self.sink_stamp != sink.stamp:
            self.buf_v[:, :, self.ring_len:] = sink.v
            self.sink_stamp = sink.stamp

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's key and value buffers [B, ring_len + sink_tokens, N, d] on the compute device."""
        return self.buf_k[i], self.buf_v[i]

    def layer_kv(self, i: int, index: torch.Tensor, rope, mask, active) -> LayerKV:
        return LayerKV(*self.layer(i), index, rope, self.ring_len, mask, active)

    def done(self, i: int, start: int, n: int) -> None:
        """Layer i's block has written ring tokens [start, start + n) into the buffers `layer(i)` gave."""

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store layer i's roped keys and values k, v: [B, n, N, d] at ring tokens [start, start + n)."""
        self.k[i, :, start:start + k.shape[1]] = k
        self.v[i, :, start:start + v.shape[1]] = v

    def read(self, i: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values of ring tokens [0, end), in the compute dtype: [B, end, N, d]."""
        return self.k[i, :, :end], self.v[i, :, :end]

    def flush(self) -> None:
        """The forward is done: pending write-backs are issued. Nothing to do when resident."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The ring's contents by name (what a saved session stores; the sink part is derived from the
        sink cache); `load` copies them back. Views of a ring + sink buffer come back as copies of the
        ring part: `torch.save` writes a view's whole storage, sink tokens included."""
        self.flush()
        return {"k": _ring_part(self.k), "v": _ring_part(self.v)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.k.copy_(tensors["k"])
        self.v.copy_(tensors["v"])

    def close(self) -> None:
        """Release the storage now (the object must not be used afterwards)."""
        self.k = self.v = self.buf_k = self.buf_v = None
        self._index, self._mask = {}, {}


def _ring_part(t: torch.Tensor) -> torch.Tensor:
    if t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone() if t.device.type == "cpu" else t.to("cpu")  # only the ring's bytes, on the host


class _StagedRing(RingKVCache):
    """A ring whose storage is not the compute buffer: layer i is staged into a device buffer of
    ring + sink tokens, whose sink part is filled per layer from the sink cache (keys re-roped)."""

    staged = True

    def __init__(self, k, v, fs: int, ring_frames: int, sink_tokens: int):
        super().__init__(k, v, fs, ring_frames)
        self._sink_tokens = sink_tokens
        self.sink = self.sink_rope = None

    @property
    def sink_tokens(self) -> int:
        return self._sink_tokens

    def set_sink(self, sink, rope) -> None:
        if self.sink_tokens != sink.layout.num_tokens:
            raise ValueError(f"this ring holds {self.sink_tokens} sink tokens, the sink has {sink.layout.num_tokens}")
        self.sink, self.sink_rope = sink, rope

    def _fill_sink(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer i's sink keys (re-roped) and values into the staging buffers k, v [B, T, N, d]."""
        r = self.ring_len
        k[:, r:] = _roped_sink_keys(self.sink, self.sink_rope, i)
        v[:, r:] = self.sink.v[i]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class StagedRingKVCache(_StagedRing):
    """A device-resident ring of the ring tokens only, k, v [num_layers, B, ring_frames·fs, N, d] in
    the compute dtype, attended through a staging buffer of one layer (ring + sink tokens, shared by
    the rings of a stage): per layer the ring part is copied in and the sink part filled from the sink
    cache. The sink is stored once instead of in every ring, for a copy of ring + sink per layer and
    forward (`--kv_sink shared`). The block's keys and values go into the staging buffer and the
    ring. Same results as a `RingKVCache` holding the sink tokens."""

    def __init__(self, k, v, fs: int, ring_frames: int, sink_tokens: int = 0,
                 staging: tuple[torch.Tensor, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
        super().__init__(k, v, fs, ring_frames, sink_tokens)
        self.dtype = dtype or k.dtype
        shape = self.staging_shape(k.shape[1], self.ring_len, sink_tokens, k.shape[3], k.shape[4])
        self.staging = staging or _zeros_kv(shape, self.dtype, k.device)
        if tuple(self.staging[0].shape) != shape:
            raise ValueError(f"a staging buffer of shape {tuple(self.staging[0].shape)} given for a ring that "
                             f"needs {shape}")

    @staticmethod
    def staging_shape(batch: int, ring_len: int, sink_tokens: int, heads: int, head_dim: int) -> tuple[int, ...]:
        return (batch, ring_len + sink_tokens, heads, head_dim)

    @classmethod
    def bytes_for(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, batch: int = 1, heads: int | None = None,
                  sink_tokens: int = 0) -> int:
        """The ring's storage, without the sink tokens (the staging buffer: `staging_bytes_for`)."""
        return _kv_bytes(cls.shape_for(cfg, fs, batch, heads), dtype)

    @classmethod
    def staging_bytes_for(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, batch: int = 1,
                          heads: int | None = None, sink_tokens: int = 0) -> int:
        """The staging buffers' bytes (K and V of one layer, ring + sink tokens): one per stage."""
        shape = cls.staging_shape(batch, cfg.ring_frames * fs, sink_tokens, heads or cfg.num_heads, cfg.head_dim)
        return _kv_bytes(shape, dtype)

    @classmethod
    def allocate(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, device="cpu", batch: int = 1,
                 heads: int | None = None, sink_tokens: int = 0, staging=None):
        k, v = _zeros_kv(cls.shape_for(cfg, fs, batch, heads), dtype, device)
        return cls(k, v, fs, cfg.ring_frames, sink_tokens, staging)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's ring (in the compute dtype) in the staging buffers, with the sink after it."""
        k, v = self.staging
        r = self.ring_len
        k[:, :r], v[:, :r] = self.read(i, r)
        self._fill_sink(i, k, v)
        return k, v

    def layer_kv(self, i: int, index, rope, mask, active) -> LayerKV:
        return StagedLayerKV(*self.layer(i), index, rope, self.ring_len, mask, active, (self.k[i], self.v[i]))

    def close(self) -> None:
        super().close()
        self.staging = None


class FP8RingKVCache(StagedRingKVCache):
    """A device-resident ring cache stored in float8 e4m3 with one fp32 scale per token and head
    (amax over the head dimension / 448): about half the bytes of bf16. Layer i is dequantised into a
    staging buffer (ring + sink tokens, the compute dtype; shared by the rings of a stage) when the
    block asks for it; the block's keys and values are quantised when written. Same results as
    quantising at write and dequantising at read."""

    def __init__(self, k, v, k_scale, v_scale, fs: int, ring_frames: int, dtype: torch.dtype,
                 sink_tokens: int = 0, staging: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(k, v, fs, ring_frames, sink_tokens, staging, dtype)
        self.k_scale, self.v_scale = k_scale, v_scale

    @classmethod
    def bytes_for(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype = torch.bfloat16, batch: int = 1,
                  heads: int | None = None, sink_tokens: int = 0) -> int:
        """The FP8 storage (the staging buffer is a block workspace: one layer, shared in a stage)."""
        shape = cls.shape_for(cfg, fs, batch, heads)
        return _kv_bytes(shape, torch.float8_e4m3fn) + _kv_bytes((*shape[:-1], 1), torch.float32)

    @classmethod
    def allocate(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, device="cpu", batch: int = 1,
                 heads: int | None = None, sink_tokens: int = 0, staging=None):
        shape = cls.shape_for(cfg, fs, batch, heads)
        k, v = _zeros_kv(shape, torch.float8_e4m3fn, device)
        ks, vs = _zeros_kv((*shape[:-1], 1), torch.float32, device)
        return cls(k, v, ks, vs, fs, cfg.ring_frames, dtype, sink_tokens, staging)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.k_scale.nbytes + self.v_scale.nbytes

    def layer_kv(self, i: int, index, rope, mask, active) -> LayerKV:
        quantized = (self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])
        return FP8LayerKV(*self.layer(i), index, rope, self.ring_len, mask, active, quantized)

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

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in self.tensors().items():
            t.copy_(tensors[name])

    def close(self) -> None:
        super().close()
        self.k_scale = self.v_scale = None


class HostRingKVCache(_StagedRing):
    """A ring cache kept in (pinned) host memory and staged one layer at a time through two device
    slots (ring + sink tokens each): layer i+1's ring part is copied in on a side stream while layer
    i computes, the sink part is filled on the device, and only the tokens a block writes go back,
    once the next layer is requested (by then the layer's attention has been issued) or at
    `flush()`. Same results as a resident `RingKVCache`; device memory is two layers' K and V instead
    of all of them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, fs: int, ring_frames: int, device, sink_tokens: int = 0):
        super().__init__(k, v, fs, ring_frames, sink_tokens)
        self.device_ = torch.device(device)
        shape = (2, 2, k.shape[1], self.ring_len + sink_tokens, *k.shape[3:])  # [slot, k/v, B, T, N, d]
        self.slots = torch.empty(shape, dtype=k.dtype, device=self.device_)
        self.loaded: list[int | None] = [None, None]
        self.pending: tuple[int, int, int] | None = None  # (layer, start, end) written, not yet copied back
        self._release = None  # unregisters the page-locked host copy (see allocate)
        if self.device_.type == "cuda":
            self.stream = torch.cuda.Stream(self.device_)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]
        else:
            self.stream = None

    @property
    def device(self) -> torch.device:
        return self.device_

    @staticmethod
    def device_bytes_for(cfg: DiTConfig, fs: int, dtype: torch.dtype, batch: int = 1, heads: int | None = None,
                         sink_tokens: int = 0) -> int:
        return 2 * RingKVCache.bytes_for(cfg, fs, dtype, batch, heads, sink_tokens) // cfg.num_layers

    @classmethod
    def allocate(cls, cfg: DiTConfig, fs: int, dtype: torch.dtype, device="cpu", batch: int = 1,
                 heads: int | None = None, sink_tokens: int = 0):
        host = "meta" if torch.device(device).type == "meta" else "cpu"  # sizes only, on meta
        k, v = _zeros_kv(cls.shape_for(cfg, fs, batch, heads), dtype, host)
        cache = cls(k, v, fs, cfg.ring_frames, device, sink_tokens)
        if cache.device.type == "cuda":
            # Page-locked in place at their exact size (`pin_memory()` would round each up to a power of 2).
            from liveavatar.runtime.offload import pin_in_place, unpin

            cache.k, cache.v = pin_in_place(k), pin_in_place(v)
            cache.buf_k, cache.buf_v = cache.k, cache.v
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
        r = self.ring_len
        if self.stream is None:
            self.slots[s, 0, :, :r].copy_(self.k[i])
            self.slots[s, 1, :, :r].copy_(self.v[i])
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[s])  # the slot's previous layer is done and written back
            self.slots[s, 0, :, :r].copy_(self.k[i], non_blocking=True)
            self.slots[s, 1, :, :r].copy_(self.v[i], non_blocking=True)
            self.ready[s].record(self.stream)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending is not None and self.pending[0] != i:
            self.flush()  # the previous layer's attention has been issued: copy its new tokens back
        self._fetch(i)
        s = i % 2
        if self.stream is not None:
            torch.cuda.current_stream(self.device_).wait_event(self.ready[s])
        if i + 1 < self.k.shape[0]:
            self._fetch(i + 1)  # overlaps layer i's compute
        k, v = self.slots[s, 0], self.slots[s, 1]
        if self.sink is not None:
            self._fill_sink(i, k, v)
        return k, v

    def done(self, i: int, start: int, n: int) -> None:
        self.pending = (i, start, start + n)

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kk, vv = self.layer(i)
        kk[:, start:start + k.shape[1]] = k
        vv[:, start:start + v.shape[1]] = v
        self.done(i, start, k.shape[1])

    def read(self, i: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        kk, vv = self.layer(i)
        return kk[:, :end], vv[:, :end]

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
        done.record(torch.cuda.current_stream(self.device_))
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
            torch.cuda.current_stream(self.device_).synchronize()  # nothing reads the slots any more
        if self._release is not None:
            self._release()  # waits for the side stream, then unregisters
        elif self.stream is not None:
            self.stream.synchronize()
        super().close()
        self.slots = None


class SinkCache:
    """Sink K (pre-RoPE) and V per layer: k, v [num_layers, B, num_tokens, N, d]. `stamp` changes with
    the contents (prefill, load), so rings holding a copy of the values know when to refresh it."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, layout: SinkLayout):
        self.k, self.v, self.layout = k, v, layout
        self.stamp = next(_stamps)

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
        self.stamp = next(_stamps)

    def close(self) -> None:
        self.k = self.v = None


class _PrefillLayer:
    """Layer i of the sink prefill: keys (before RoPE) and values go into the sink; the prefill tokens
    attend to themselves."""

    mask = None

    def __init__(self, sink: SinkCache, i: int, rope):
        self.sink, self.i, self.rope = sink, i, rope

    def kv(self, k: torch.Tensor, k_roped: torch.Tensor, v: torch.Tensor):
        self.sink.k[self.i].copy_(k)
        self.sink.v[self.i].copy_(v)
        return k_roped, v


class SinkPrefill:
    """Attention context of the sink prefill: each layer's keys (before RoPE) and values go into the
    sink cache; the prefill tokens attend to themselves. `rope`: cos/sin [num_tokens, d/2] of the sink
    tokens at the prefill reference position, on the compute device."""

    def __init__(self, sink: SinkCache, rope: tuple[torch.Tensor, torch.Tensor]):
        self.sink, self.rope = sink, rope

    def layer(self, i: int) -> _PrefillLayer:
        return _PrefillLayer(self.sink, i, self.rope)

    def done(self, i: int) -> None:
        pass

    def finish(self) -> None:
        self.sink.stamp = next(_stamps)


class BlockAttention:
    """Attention context of one block forward at one denoising step.

    Writes the block's roped keys and values into `ring` at ring tokens [slot, slot + tokens) and
    attends, per layer, to the ring tokens [0, active) and the sink keys re-roped with `sink_rope`
    (the rolled reference position; written into the ring's buffers once, here, for every layer) and
    the sink values. `rope`: cos/sin [tokens, d/2] of the block's tokens; all tables on the compute
    device. `static`: the same tensor shapes at every slot (a key mask while the ring fills), for a
    compiled block."""

    def __init__(self, ring: RingKVCache, sink: SinkCache, rope: tuple[torch.Tensor, torch.Tensor],
                 sink_rope: tuple[torch.Tensor, torch.Tensor], slot: int, active: int, tokens: int,
                 static: bool = False):
        self.ring, self.sink, self.rope, self.sink_rope = ring, sink, rope, sink_rope
        self.slot, self.active, self.tokens = slot, active, tokens
        ring.set_sink(sink, sink_rope)
        self.index = ring.token_index(slot, tokens)
        full = active == ring.ring_len
        self.mask = None if full or not static else ring.key_mask(active)
        self._active = None if full or static else active

    def layer(self, i: int) -> LayerKV:
        return self.ring.layer_kv(i, self.index, self.rope, self.mask, self._active)

    def done(self, i: int) -> None:
        self.ring.done(i, self.slot, self.tokens)

    def finish(self) -> None:
        """The forward is done: the ring's last write is committed."""
        self.ring.flush()
