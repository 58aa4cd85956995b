"""3-axis rotary position embedding of the S2V DiT.

Each head of width d holds d/2 complex pairs (x[2j], x[2j+1]), interleaved, split into time /
height / width groups (22/21/21 at d = 128). A token at grid position (t, h, w) is rotated by the
angles p·10000^(-2j/D_axis) of its own axis, where D_axis is twice that axis' pair count.

Fidelity: the official code stores the cos/sin factors in complex32, i.e. rounded to fp16. We round
them the same way, from angles computed in float64, so factors are bit-identical to the official
45,000-row table; positions beyond that table (about 2 h of video) use the same formula instead of
failing. The rotation itself runs in float32 (the official code upcasts to complex128); the
difference is far below bf16 resolution.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

THETA = 10000.0


def _axis_factors(pos: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [len(pos), pairs] (fp16-rounded, returned as float32) for one axis; pos may be < 0."""
    dim = 2 * pairs
    inv = 1.0 / torch.pow(torch.tensor(THETA, dtype=torch.float64),
                          torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    sign = torch.sign(pos.to(torch.float64)).unsqueeze(1)
    sign[sign == 0] = 1.0
    ang = torch.outer(pos.abs().to(torch.float64), inv)
    # Negative positions take the complex conjugate of |p|'s factor, as the official table lookup does.
    cos = torch.cos(ang).to(torch.float16).float()
    sin = (torch.sin(ang).to(torch.float16).float()) * sign.float()
    return cos, sin


def grid_factors(t_pos, h_pos, w_pos, split: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors for the (t, h, w) grid flattened in (t, h, w) order: cos, sin [T·H·W, d/2] float32.

    Memoised (a block's 4 denoising steps use the same grid); the returned tensors are shared, so
    callers must not modify them."""
    return _grid_factors(tuple(int(p) for p in t_pos), tuple(int(p) for p in h_pos),
                         tuple(int(p) for p in w_pos), tuple(split))


@functools.lru_cache(maxsize=32)
def _grid_factors(t_pos, h_pos, w_pos, split) -> tuple[torch.Tensor, torch.Tensor]:
    t_pos, h_pos, w_pos = (torch.as_tensor(np.asarray(p), dtype=torch.int64) for p in (t_pos, h_pos, w_pos))
    ct, st = _axis_factors(t_pos, split[0])
    ch, sh = _axis_factors(h_pos, split[1])
    cw, sw = _axis_factors(w_pos, split[2])
    nt, nh, nw = len(t_pos), len(h_pos), len(w_pos)

    def cat(a, b, c):
        return torch.cat([
            a.view(nt, 1, 1, -1).expand(nt, nh, nw, -1),
            b.view(1, nh, 1, -1).expand(nt, nh, nw, -1),
            c.view(1, 1, nw, -1).expand(nt, nh, nw, -1),
        ], dim=-1).reshape(nt * nh * nw, -1)

    return cat(ct, ch, cw), cat(st, sh, sw)


def sample_positions(start: int, span: int, count: int) -> list[int]:
    """`count` integer positions spread over [start, start + span - 1], truncated as numpy does."""
    return np.linspace(start, start + span - 1, count).astype(int).tolist()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x: [B, L, N, d]; cos/sin: [L, d/2] (float32). Returns x.dtype."""
    b, seq, n, d = x.shape
    xf = x.float().reshape(b, seq, n, d // 2, 2)
    re, im = xf.unbind(-1)
    c = cos.view(1, seq, 1, d // 2)
    s = sin.view(1, seq, 1, d // 2)
    out = torch.stack([re * c - im * s, re * s + im * c], dim=-1)
    return out.reshape(b, seq, n, d).to(x.dtype)
