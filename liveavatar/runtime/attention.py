"""Which scaled-dot-product-attention kernel the DiT runs: `--attention auto|cudnn|flash|efficient|math`.

PyTorch picks an SDPA kernel per call from the enabled backends (`torch.nn.attention.sdpa_kernel`).
`attention_backends(name, device)` turns the flag into the backends to enable, after checking with a
small probe call at the DiT's head dimension and dtype that the kernel runs on this device (a
requested kernel that does not is a `UserError` naming what does). `apply_attention_backend(model,
...)` makes the model's forward and sink prefill run under them, without touching the model code.

`auto` on CUDA enables every backend that runs, fastest first (`set_priority`): cuDNN first on
Hopper and newer (compute capability >= 9.0, where it measured 1.7-2.3x faster than the others in
transformers PR #48163), flash attention first elsewhere (cuDNN was 0.82-1.00x there); math last.
On the CPU `auto` leaves PyTorch's own choice (its fused CPU kernel, under the `flash` name, or math).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from liveavatar.errors import UserError

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CHOICES = ("auto", *BACKENDS)


@functools.lru_cache(maxsize=64)
def runs(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128) -> bool:
    """Whether backend `name` runs an attention of `head_dim` in `dtype` on `device` (a probe call)."""
    q = torch.randn(1, 2, 64, head_dim, device=device).to(dtype)
    try:
        with sdpa_kernel([BACKENDS[name]]):
            F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


def preference(device: torch.device) -> list[str]:
    """Backends fastest first on `device` (see the module docstring for the evidence)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        return ["cudnn", "flash", "efficient", "math"]
    return ["flash", "cudnn", "efficient", "math"]


def attention_backends(name: str, device, dtype: torch.dtype = torch.bfloat16,
                       head_dim: int = 128) -> list[SDPBackend] | None:
    """The SDPA backends to enable for `--attention name` on `device`, fastest first; None: PyTorch's
    own choice (auto off CUDA). Raises UserError if the requested backend does not run here."""
    if name not in CHOICES:
        raise UserError(f"--attention {name!r} is not one of {', '.join(CHOICES)}")
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return None
        return [BACKENDS[b] for b in preference(device) if runs(b, device, dtype, head_dim)]
    if not runs(name, device, dtype, head_dim):
        here = [b for b in BACKENDS if runs(b, device, dtype, head_dim)]
        kind = str(dtype).removeprefix("torch.")
        raise UserError(f"--attention {name}: that kernel does not run on {device} with {kind} and head dimension "
                        f"{head_dim} (torch {torch.__version__}); use --attention auto or one of {', '.join(here)}")
    return [BACKENDS[name]]


@contextlib.contextmanager
def enabled(backends: list[SDPBackend] | None):
    """Run the body with only `backends` enabled, tried in their order (no-op for None)."""
    if backends is None:
        yield
        return
    try:
        ctx = sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without priorities: the set is enforced, PyTorch orders it
        ctx = sdpa_kernel(backends)
    with ctx:
        yield


def apply_attention_backend(model: torch.nn.Module, name: str, device, dtype: torch.dtype | None = None):
    """Run `model`'s forward and `prefill_sink` (when it has one) under `--attention name`; returns the
    backends (None: unchanged). The check runs here, before any forward."""
    cfg = getattr(model, "cfg", None)
    head_dim = cfg.dim // cfg.num_heads if cfg is not None else 128
    dtype = dtype or next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):  # FP8 weights: activations are bf16
        dtype = torch.bfloat16
    backends = attention_backends(name, device, dtype, head_dim)
    if backends is None:
        return None
    for method in ("forward", "prefill_sink"):
        fn = getattr(model, method, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, **kwargs):
            with enabled(backends):
                return _fn(*args, **kwargs)

        setattr(model, method, functools.wraps(fn)(wrapped))
    return backends


__all__ = ["BACKENDS", "CHOICES", "apply_attention_backend", "attention_backends", "enabled", "preference", "runs"]
