"""The speed model: seconds of one DiT block forward on a GPU, from the work the code does.

The work is counted, not estimated by hand: one full-size block forward (steady state: a full ring)
runs on the `meta` device under a function mode and a dispatch mode that record every Linear
(M, K, N, and whether `apply_fp8` turns it into FP8), every attention call (heads, query and key
lengths), every convolution, and every other operator's memory traffic (bytes read and written;
views are free, broadcast inputs count once). `forward_work` returns that account.

Each part is then timed by a roofline at data-sheet rates (`liveavatar.runtime.gpus`) scaled by an
assumed achievable fraction, and the parts are added (one stream runs them one after another):
- Linears: max(2MKN / (rate · GEMM_EFFICIENCY), bytes / (bandwidth · BANDWIDTH_EFFICIENCY)). An FP8
  Linear (`--fp8`) runs at the FP8 rate with 1-byte operands *plus* the quantisation of its input
  (bytes per element: `QUANT_BYTES`), or, where that is slower or the GPU has no FP8 tensor cores, on
  its weight dequantised to bf16 (`DEQUANT_BYTES` per weight element) at the bf16 rate: per Linear,
  whichever the model says is faster, which is what `FP8Linear` does at run time (`fp8_gemm_faster`).
- Attention: 4·Lq·Lk·d per head at the bf16 rate · ATTENTION_EFFICIENCY (never the FP8 rate).
- Everything else (norms, modulation, RoPE, casts, concatenations, cache writes, the sink keys
  re-roped per forward and, with `--kv_sink shared`, each layer's ring and sink staged): bytes over the
  memory bandwidth · BANDWIDTH_EFFICIENCY, plus, with `--kv_fp8`, the ring's quantisation on write and
  dequantisation on read.
- Host dispatch: eager PyTorch issues each operator from Python (about DISPATCH_SECONDS each); the
  forward takes at least that long even when the GPU is faster.
The efficiencies are assumptions (docs/memory.md gives their grounds); nothing here is measured.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from liveavatar.config import Preset
from liveavatar.runtime.gpus import GPUSpec

GEMM_EFFICIENCY = 0.75  # share of the dense tensor-core peak large GEMMs reach (cuBLAS, bf16 and FP8)
ATTENTION_EFFICIENCY = 0.5  # share of the bf16 peak fused attention reaches at head dim 128
BANDWIDTH_EFFICIENCY = 0.8  # share of the memory bandwidth elementwise kernels reach
DISPATCH_SECONDS = 6e-6  # host time to issue one eager operator
FP32_RATE = 1 / 8  # fp32 matmuls (the fp32 regions: time embedding, head) run at about 1/8 of the bf16 rate
# Bytes moved per element of a bf16 input when quantising it to FP8 e4m3 with per-row scales:
# fused (one compiled kernel: read for the amax, read again, write 1 byte) and eager (counted by
# tracing `fp8.quantize_fp8`). Dequantising an FP8 tensor to bf16: read 1 byte, write 2 (fused).
QUANT_BYTES = {"compiled": 5.0}
DEQUANT_BYTES = {"compiled": 3.0}

_VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "select", "slice", "permute",
          "alias", "unbind", "split", "split_with_sizes", "detach", "as_strided", "unflatten", "_reshape_alias"}

_COPIES = {"copy_", "index_copy_"}  # write their source's elements into the destination, read nothing else of it


def _read_bytes(t: torch.Tensor) -> int:
    """Distinct bytes a kernel reads from `t` (a broadcast dimension, stride 0, is read once)."""
    return math.prod(s for s, st in zip(t.shape, t.stride(), strict=True) if st != 0) * t.element_size()


@dataclass(frozen=True)
class ForwardWork:
    """The work of one block forward. gemms: ((M, K, N, fp8 target, bytes per activation element), count);
    attention: ((batch·heads, Lq, Lk, d), count)."""

    gemms: tuple[tuple[tuple[int, int, int, bool, int], int], ...]
    attention: tuple[tuple[tuple[int, int, int, int], int], ...]
    conv_flops: float
    elementwise_bytes: float
    ops: int
    layers: int
    ring_tokens: int  # ring tokens a layer attends to (and dequantises with --kv_fp8)
    block_tokens: int  # tokens a forward writes into the ring per layer
    dim: int

    @property
    def gemm_flops(self) -> float:
        return sum(2 * m * k * n * c for (m, k, n, _, _), c in self.gemms)

    @property
    def attention_flops(self) -> float:
        return sum(4 * bh * lq * lk * d * c for (bh, lq, lk, d), c in self.attention)

    @property
    def flops(self) -> float:
        return self.gemm_flops + self.attention_flops + self.conv_flops


class _Recorder(TorchFunctionMode):
    """Linears and attention at the function level (answered with empty outputs, so their internals
    are not traced); the rest goes on to the dispatch counter."""

    def __init__(self, fp8_weights: set[int]):
        super().__init__()
        self.fp8_weights, self.gemms, self.attention = fp8_weights, Counter(), Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            m = x.numel() // x.shape[-1]
            self.gemms[(m, w.shape[1], w.shape[0], id(w) in self.fp8_weights, x.element_size())] += 1
            return torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            self.attention[(q.numel() // (q.shape[-2] * q.shape[-1]), q.shape[-2], k.shape[-2], q.shape[-1])] += 1
            return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        return func(*args, **kwargs)


class _Traffic(TorchDispatchMode):
    """Bytes read and written by every operator that is not a view or a convolution."""

    def __init__(self):
        super().__init__()
        self.bytes, self.ops, self.conv_flops = 0, 0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _VIEWS or func.is_view:
            return out
        self.ops += 1
        if name == "convolution":
            w = args[1]
            self.conv_flops += 2 * out.numel() * math.prod(w.shape[1:])
            return out
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in _COPIES:  # into (part of) the first argument: its old contents are not read
            dst, src = args[0], ins[1:]
            written = dst.numel() if name == "copy_" else args[-1].numel()
            self.bytes += sum(_read_bytes(t) for t in src) + written * dst.element_size()
            return out
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.bytes += sum(_read_bytes(t) for t in ins) + sum(o.numel() * o.element_size() for o in outs)
        return out


def count_traffic(fn, *args) -> tuple[int, int]:
    """(bytes moved, operators) of `fn(*args)` run eagerly (views free); for the eager quantisers."""
    with _Traffic() as t:
        fn(*args)
    return t.bytes, t.ops


@functools.lru_cache(maxsize=16)
def forward_work(preset: Preset, height: int, width: int, sink_shared: bool = False) -> ForwardWork:
    """The work of one steady-state block forward (full ring) at `height` x `width`, counted on meta,
    with the attention context's per-forward work (the sink keys re-roped into the ring's buffers, or,
    `sink_shared`, the ring and the sink staged per layer: `--kv_sink shared`)."""
    from liveavatar.engine.denoise import block_attention, block_tables
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.models.layout import SinkLayout
    from liveavatar.runtime.fp8 import fp8_targets
    from liveavatar.runtime.kv_cache import RingKVCache, SinkCache, StagedRingKVCache

    cfg = preset.dit
    dtype = torch.bfloat16
    with torch.device("meta"):
        model = CausalS2VDiT(cfg).to(dtype)
    fp8 = {id(model.get_submodule(n).weight) for n in fp8_targets(model)}
    layout = SinkLayout(height // 8, width // 8, cfg.zip_frame_buckets)
    kind = StagedRingKVCache if sink_shared else RingKVCache
    ring = kind.allocate(cfg, layout.fs, dtype, device="meta", sink_tokens=layout.num_tokens)
    sink = SinkCache.allocate(cfg, layout, dtype, device="meta")
    f, start = cfg.frames_per_block, 2 * cfg.ring_frames  # a full ring
    rope, (sink_tables,) = block_tables(cfg, layout, start, f, [6], "meta")
    block_attention(cfg, ring, sink, start, 6, f, "meta", rope, sink_tables)  # sink values in: once per refresh
    z = torch.empty(1, cfg.in_dim, f, height // 8, width // 8, device="meta")
    audio = torch.empty(1, cfg.audio_layers, cfg.audio_dim, 4 * f, device="meta")
    text = torch.empty(1, cfg.text_len, cfg.dim, device="meta", dtype=dtype)
    rec, traffic = _Recorder(fp8), _Traffic()
    with torch.no_grad(), rec, traffic:
        ctx = block_attention(cfg, ring, sink, start, 6, f, "meta", rope, sink_tables)
        model(z, torch.full((1,), 500.0, device="meta"), audio, text, ctx)
    return ForwardWork(tuple(sorted(rec.gemms.items())), tuple(sorted(rec.attention.items())), traffic.conv_flops,
                       traffic.bytes, traffic.ops + sum(rec.gemms.values()) + sum(rec.attention.values()),
                       cfg.num_layers, ring.ring_len, f * layout.fs, cfg.dim)


@functools.lru_cache(maxsize=4)
def quant_cost(quantiser: str) -> tuple[float, int]:
    """(bytes per element, kernels) of quantising a bf16 activation to FP8 with per-row scales."""
    if quantiser in QUANT_BYTES:
        return QUANT_BYTES[quantiser], 1
    from liveavatar.runtime.fp8 import quantize_fp8

    x = torch.empty(64, 1024, dtype=torch.bfloat16, device="meta")
    moved, ops = count_traffic(quantize_fp8, x, "row")
    return moved / x.numel(), ops


@functools.lru_cache(maxsize=4)
def dequant_cost(quantiser: str) -> tuple[float, int]:
    """(bytes per element, kernels) of dequantising an FP8 tensor with per-row scales to bf16."""
    if quantiser in DEQUANT_BYTES:
        return DEQUANT_BYTES[quantiser], 1
    from liveavatar.runtime.fp8 import dequantize_fp8

    q = torch.empty(64, 1024, dtype=torch.float8_e4m3fn, device="meta")
    s = torch.empty(64, 1, dtype=torch.float32, device="meta")
    moved, ops = count_traffic(dequantize_fp8, q, s, torch.bfloat16)
    return moved / q.numel(), ops


def _bw(gpu: GPUSpec) -> float:
    return gpu.mem_gbps * 1e9 * BANDWIDTH_EFFICIENCY


def gemm_seconds(gpu: GPUSpec, m: int, k: int, n: int, fp8: bool = False, act_bytes: int = 2) -> float:
    """Roofline time of y[M, N] = x[M, K] · Wᵀ: at the FP8 rate with 1-byte operands, or at the bf16
    (fp32: a fraction of it) rate."""
    rate = (gpu.fp8_tflops if fp8 else gpu.tflops * (FP32_RATE if act_bytes == 4 else 1)) * 1e12 * GEMM_EFFICIENCY
    size = 1 if fp8 else act_bytes
    return max(2 * m * k * n / rate, (m * k * size + k * n * size + m * n * max(act_bytes, 2)) / _bw(gpu))


def fp8_linear_seconds(gpu: GPUSpec, m: int, k: int, n: int, quantiser: str = "compiled") -> tuple[float, float]:
    """(seconds with an FP8 GEMM and the input quantised, seconds with the weight dequantised and a bf16
    GEMM) of an FP8 Linear; the first is inf without FP8 tensor cores."""
    scaled = (gemm_seconds(gpu, m, k, n, fp8=True) + m * k * quant_cost(quantiser)[0] / _bw(gpu)
              if gpu.has_fp8 else math.inf)
    dequant = n * k * dequant_cost(quantiser)[0] / _bw(gpu) + gemm_seconds(gpu, m, k, n)
    return scaled, dequant


def fp8_gemm_faster(gpu: GPUSpec, m: int, k: int, n: int, quantiser: str = "compiled") -> bool:
    """Whether the FP8 GEMM (input quantised) beats dequantising the weight, for this shape on this GPU."""
    scaled, dequant = fp8_linear_seconds(gpu, m, k, n, quantiser)
    return scaled < dequant


def forward_seconds(work: ForwardWork, gpu: GPUSpec, fp8: bool = False, kv_fp8: bool = False,
                    quantiser: str = "compiled", share: int = 1) -> dict[str, float]:
    """Seconds of one block forward by part (`gemm`, `attention`, `elementwise`, `quantisation`, `total`).
    `share`: ranks splitting the forward's tokens and heads (sequence parallelism)."""
    gemm = quant = 0.0
    ops = work.ops
    for (m, k, n, target, act), count in work.gemms:
        m = -(-m // share)
        if fp8 and target:
            scaled, dequant = fp8_linear_seconds(gpu, m, k, n, quantiser)
            core = gemm_seconds(gpu, m, k, n, fp8=scaled <= dequant)  # the GEMM itself, FP8 or bf16
            gemm += count * core
            quant += count * (min(scaled, dequant) - core)  # quantising the input or dequantising the weight
            ops += count * (quant_cost if scaled <= dequant else dequant_cost)(quantiser)[1]
        else:
            gemm += count * gemm_seconds(gpu, m, k, n, act_bytes=act)
    attn_rate = gpu.tflops * 1e12 * ATTENTION_EFFICIENCY
    attention = sum(c * max(4 * bh * lq * lk * d / share / attn_rate, 2 * bh * (2 * lq + 2 * lk) * d / share / _bw(gpu))
                    for (bh, lq, lk, d), c in work.attention)
    elementwise = work.elementwise_bytes / share / _bw(gpu) + work.conv_flops / share / (gpu.tflops * 1e12 * 0.5)
    if kv_fp8:  # K and V of the block quantised on write, the whole active ring dequantised on read, per layer
        (qb, qops), (db, dops) = quant_cost(quantiser), dequant_cost(quantiser)
        per_layer = 2 * work.dim // share * (work.block_tokens * qb + work.ring_tokens * db)
        quant += work.layers * per_layer / _bw(gpu)
        ops += work.layers * 2 * (qops + dops)
    device = gemm + attention + elementwise + quant
    total = max(device, ops * DISPATCH_SECONDS)
    return {"gemm": gemm, "attention": attention, "elementwise": elementwise, "quantisation": quant,
            "host_dispatch": ops * DISPATCH_SECONDS, "total": total}


__all__ = [
    "ATTENTION_EFFICIENCY", "BANDWIDTH_EFFICIENCY", "DISPATCH_SECONDS", "ForwardWork", "GEMM_EFFICIENCY",
    "count_traffic", "dequant_cost", "fp8_gemm_faster", "fp8_linear_seconds", "forward_seconds", "forward_work",
    "gemm_seconds", "quant_cost",
]
