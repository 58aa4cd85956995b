"""FP8 (e4m3) weight quantization of a built DiT: `FP8Linear` and `apply_fp8`.

`apply_fp8(model)` swaps, in place, every `nn.Linear` outside a skip list for an `FP8Linear` that
stores the weight as `float8_e4m3fn` with an fp32 dequantisation scale per output channel (default)
or per tensor (the official scheme, architecture.md §9.7); the bias keeps its dtype. With the
official skip list (text/time embeddings, time projection, head, audio-encoder final linear) the
14B DiT gets 460 FP8 layers: 40×10 block linears, 48 injector q/k/v/o and 12 AdaLN linears. It is
applied to an already LoRA-merged model. Module names do not change, so the state dict holds
`<name>.weight` (fp8) and `<name>.weight_scale` (fp32). On CUDA with compute capability >= 8.9
the forward quantises the activation dynamically (per tensor, or per row for per-channel weights)
and runs `torch._scaled_mm`; elsewhere it dequantises the weight to the activation dtype and calls
`F.linear`. Everything here also works on `meta` tensors, and `fp8_nbytes` gives the byte size of
a quantized model from shapes alone (the memory planner's number).

Weights are quantised once, when `apply_fp8` runs (after the LoRA merge, at load). What runs per call
is cheap only if it is fused: `fp8_kernels(device)` gives the activation quantiser and the
dequantiser as one `torch.compile`d kernel each on CUDA (eager, several passes, elsewhere or if
compilation fails; inside a compiled region the eager code, which the outer graph fuses). With
`gemm="auto"` an `FP8Linear` takes the FP8 GEMM only where the speed model
(`liveavatar.runtime.speed.fp8_gemm_faster`) says it beats dequantising the weight for its shape on
this GPU (always, for the DiT's shapes on an H100 with the compiled quantiser; never without FP8
tensor cores). `FP8RingKVCache` quantises and dequantises with the same kernels.

Weight scales use the full e4m3 range (scale = amax / 448), unlike the official code, which caps
the multiplier 448 / amax at 448 and so under-uses the range for weights with amax < 1.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# The official `ignore_keys`: these linears run in fp32 regions of the model (`dit.linear_f32`).
DEFAULT_SKIP = (
    "text_embedding", "time_embedding", "time_projection", "head.head", "casual_audio_encoder.encoder.final_linear",
)
GRANULARITIES = ("channel", "tensor")
QUANTISERS = ("auto", "compiled", "eager")


def quantize_fp8(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 quantisation: x ≈ q · scale.

    x: [N, K]. granularity "channel"/"row": one scale per row, scale [N, 1]; "tensor": scale [].
    Returns q (float8_e4m3fn, [N, K]) and scale (fp32)."""
    xf = x.float()
    if granularity == "tensor":
        amax = xf.abs().amax()
    else:
        amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q · scale computed in fp32 and rounded once to `dtype` (scale broadcasts against q)."""
    return (q.float() * scale).to(dtype)


_compiled: dict[str, tuple] = {}  # device type -> (quantize, dequantize) compiled, or the eager pair


def _eager_pair():
    return quantize_fp8, dequantize_fp8


def _compiled_pair(device_type: str):
    if device_type not in _compiled:
        try:
            q = torch.compile(quantize_fp8, dynamic=None)
            d = torch.compile(dequantize_fp8, dynamic=None)
            probe = torch.ones(2, 16, dtype=torch.bfloat16, device=device_type)
            d(*q(probe, "row"), torch.bfloat16)  # compile errors surface here, once
            _compiled[device_type] = (q, d)
        except Exception as exc:  # no compiler toolchain, an unsupported backend...: stay eager
            warnings.warn(f"FP8 kernels could not be compiled on {device_type} ({type(exc).__name__}: {exc}); "
                          "quantising with the unfused eager code", stacklevel=3)
            _compiled[device_type] = _eager_pair()
    return _compiled[device_type]


def fp8_kernels(device: torch.device | str, quantiser: str = "auto"):
    """(quantize, dequantize) for tensors on `device`: `quantize(x, granularity) -> (q, scale)` and
    `dequantize(q, scale, dtype)`, each one fused kernel when compiled. `quantiser`: "auto" (compiled
    on CUDA, eager elsewhere), "compiled" or "eager". Inside a region being compiled the eager code
    is returned, for the outer graph to fuse."""
    if quantiser not in QUANTISERS:
        raise ValueError(f"quantiser must be one of {QUANTISERS}, got {quantiser!r}")
    device_type = torch.device(device).type
    if quantiser == "eager" or torch.compiler.is_compiling() or device_type == "meta":
        return _eager_pair()
    if quantiser == "auto" and device_type != "cuda":
        return _eager_pair()
    return _compiled_pair(device_type)


@functools.lru_cache(maxsize=16)
def _device_spec(device: torch.device):
    from liveavatar.runtime.gpus import from_device

    return from_device(device)


def _scaled_mm_supported(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


class FP8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as e4m3 and W ≈ weight · weight_scale (per output channel or tensor).

    `gemm`: "auto" (the FP8 GEMM where supported and faster than dequantising, per input shape, by the
    speed model), "scaled_mm" or "dequant" (forced). `quantiser`: see `fp8_kernels`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, granularity: str = "channel",
                 bias_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        self.gemm = "auto"
        self.quantiser = "auto"
        self._faster: dict[tuple, bool] = {}  # (device, rows) -> the FP8 GEMM is faster
        scale_shape = (out_features,) if granularity == "channel" else ()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "channel") -> FP8Linear:
        w = linear.weight.detach()
        bias = linear.bias
        m = cls(linear.in_features, linear.out_features, bias is not None, granularity,
                bias_dtype=w.dtype if bias is None else bias.dtype, device=w.device)
        q, scale = quantize_fp8(w, granularity)
        m.weight.data = q
        m.weight_scale.data = scale.reshape(m.weight_scale.shape)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, granularity={self.granularity}")

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W ≈ weight · weight_scale, computed in fp32 and rounded once to `dtype`: [out, in]."""
        scale = self.weight_scale.reshape(-1, 1) if self.granularity == "channel" else self.weight_scale
        return fp8_kernels(self.weight.device, self.quantiser)[1](self.weight, scale, dtype)

    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        if self.gemm != "auto":
            return self.gemm == "scaled_mm"
        if not _scaled_mm_supported(x.device):
            return False
        # FP8 GEMM: K and N multiples of 16; bf16 output and bias (rowwise scaling allows nothing else).
        if not (x.dtype == torch.bfloat16 and self.in_features % 16 == 0 and self.out_features % 16 == 0):
            return False
        rows = x.numel() // self.in_features
        key = (x.device, rows)
        if key not in self._faster:
            from liveavatar.runtime.speed import fp8_gemm_faster

            quantiser = "eager" if self.quantiser == "eager" else "compiled"
            self._faster[key] = fp8_gemm_faster(_device_spec(x.device), rows, self.in_features, self.out_features,
                                                quantiser)
        return self._faster[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out] in x.dtype."""
        if not self._use_scaled_mm(x):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        x2 = x.reshape(-1, self.in_features)
        quantize = fp8_kernels(x.device, self.quantiser)[0]
        # Dynamic activation scale: per row when the weight has per-channel scales (rowwise GEMM),
        # else one per tensor.
        if self.granularity == "channel":
            xq, sx = quantize(x2, "row")  # sx: [M, 1]
            sw = self.weight_scale.reshape(1, -1)  # [1, N]
        else:
            xq, sx = quantize(x2, "tensor")  # sx: []
            sw = self.weight_scale
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=x.dtype,
                             use_fast_accum=True)
        if isinstance(y, tuple):  # torch < 2.5 returned (out, amax)
            y = y[0]
        return y.reshape(*x.shape[:-1], self.out_features)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def fp8_targets(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the `nn.Linear` modules `apply_fp8` quantizes (everything outside `skip`)."""
    skip = tuple(skip)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)]


def apply_fp8(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, granularity: str = "channel") -> nn.Module:
    """Replace every `nn.Linear` outside `skip` (module-name prefixes) by an `FP8Linear`, in place.

    Apply it last among dtype changes: a later `model.to(dtype)` would cast the fp8 weights too.
    Works on meta models (shapes and dtypes only). Returns `model`."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    for name in fp8_targets(model, skip):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), granularity))
    return model


def fp8_nbytes(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, granularity: str = "channel") -> int:
    """Bytes of the parameters and buffers of `model` once `apply_fp8(model, skip, granularity)` has run,
    from shapes alone (the model may live on meta and stay unquantized)."""
    targets = set(fp8_targets(model, skip))
    total = 0
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if mname in targets and pname == "weight":
                out_features = t.shape[0]
                total += t.numel() + 4 * (out_features if granularity == "channel" else 1)
            else:
                total += t.numel() * t.element_size()
    return total


def count_fp8(model: nn.Module) -> int:
    return sum(isinstance(m, FP8Linear) for m in model.modules())


__all__ = [
    "DEFAULT_SKIP", "FP8Linear", "FP8_DTYPE", "FP8_MAX", "apply_fp8", "count_fp8", "dequantize_fp8", "fp8_kernels",
    "fp8_nbytes", "fp8_targets", "quantize_fp8",
]
