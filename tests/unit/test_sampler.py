"""The 4-step flow-matching Euler schedule against the official (diffusers) values."""

import torch

from liveavatar.config import SamplerConfig
from liveavatar.engine.sampler import euler_step, make_schedule


def test_four_step_schedule_matches_official_values():
    s = make_schedule(SamplerConfig())
    # float32 timesteps of FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(4)
    expected = [1000.0, 857.69232, 602.15057, 8.9285717]
    assert len(s) == 4
    for got, want in zip(s.timesteps, expected, strict=True):
        assert abs(got - want) < 1e-3
    assert s.sigmas[-1] == 0.0 and s.sigmas[0] == 1.0
    # the parity fixture's streaming timestep is schedule step 1, bit for bit
    assert torch.tensor(s.timesteps[1], dtype=torch.float32).item() == torch.tensor(857.6923).item()


def test_euler_step_is_float32_update_cast_back():
    s = make_schedule(SamplerConfig())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=g).to(torch.bfloat16)
    v = torch.randn(2, 3, generator=g).to(torch.bfloat16)
    out = euler_step(x, v, s, 2)
    dt = torch.tensor(s.sigmas[3], dtype=torch.float32) - torch.tensor(s.sigmas[2], dtype=torch.float32)
    ref = (x.float() + dt * v.float()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    # integrating a constant velocity over the whole schedule lands on x - v (sigma 1 -> 0)
    z = x.float()
    for i in range(len(s)):
        z = euler_step(z, v.float(), s, i)
    assert torch.allclose(z, x.float() - v.float(), atol=1e-6)
