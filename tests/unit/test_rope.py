"""RoPE factors and rotation against an independent complex-number computation."""

import warnings

import torch

from liveavatar.config import DiTConfig
from liveavatar.models.rope import _axis_factors, apply_rope, grid_factors


def _official_table(rows: int, pairs: int) -> torch.Tensor:
    """The official table built the official way: float64 polar factors stored into complex32."""
    ang = torch.outer(torch.arange(rows), 1.0 / torch.pow(10000, torch.arange(0, 2 * pairs, 2).double() / (2 * pairs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.zeros(rows, pairs, dtype=torch.complex32)
        out[:] = torch.polar(torch.ones_like(ang), ang)
        return torch.complex(out.real.float(), out.imag.float())


def test_factors_bit_identical_to_fp16_rounded_table():
    for pairs in DiTConfig().rope_split[:2]:  # 22 (time) and 21 (height/width)
        ref = _official_table(45000, pairs)
        cos, sin = _axis_factors(torch.arange(45000), pairs)
        assert torch.equal(cos, ref.real) and torch.equal(sin, ref.imag)
        # negative positions use the conjugate
        cos_n, sin_n = _axis_factors(-torch.arange(1, 100), pairs)
        assert torch.equal(cos_n, ref.real[1:100]) and torch.equal(sin_n, -ref.imag[1:100])


def test_positions_past_the_table_continue_the_formula():
    cos, sin = _axis_factors(torch.tensor([44999, 45000, 90000]), 22)
    assert torch.isfinite(cos).all() and (cos.abs() <= 1).all()
    assert not torch.equal(cos[1], cos[2])


def test_apply_rope_matches_complex_multiplication():
    g = torch.Generator().manual_seed(0)
    split = (4, 2, 2)
    cos, sin = grid_factors([5, 6], [0, 1, 2], [0, 3], split)  # 12 tokens, t/h/w order
    x = torch.randn(1, 12, 3, 16, generator=g)
    ours = apply_rope(x, cos, sin)
    xc = torch.view_as_complex(x.double().reshape(1, 12, 3, 8, 2))
    f = torch.complex(cos.double(), sin.double()).view(1, 12, 1, 8)
    ref = torch.view_as_real(xc * f).reshape(1, 12, 3, 16)
    assert (ours.double() - ref).abs().max() < 1e-5
    # token 5 = (t=5, h=2, w=3): its time pairs rotate by position 5, height by 2, width by 3
    c_t, _ = _axis_factors(torch.tensor([5]), 4)
    c_h, _ = _axis_factors(torch.tensor([2]), 2)
    c_w, _ = _axis_factors(torch.tensor([3]), 2)
    assert torch.equal(cos[5], torch.cat([c_t[0], c_h[0], c_w[0]]))
