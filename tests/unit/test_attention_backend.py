"""`--attention` (liveavatar/runtime/attention.py): the kernels that run on the CPU are accepted and
give the math result, the ones that do not are one clear error before anything loads, and `auto`
leaves the CPU's choice alone."""

import pytest
import torch
import torch.nn.functional as F
from tiny_dit import one_thread, run_blocks  # noqa: F401  (one_thread: autouse fixture)

from liveavatar.cli import main
from liveavatar.config import TINY
from liveavatar.errors import UserError
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.runtime import attention as att


def test_cpu_backends():
    cpu = torch.device("cpu")
    assert att.attention_backends("auto", cpu) is None
    assert att.attention_backends("math", cpu) == [att.BACKENDS["math"]]
    assert att.runs("math", cpu) and not att.runs("cudnn", cpu)
    with pytest.raises(UserError, match=r"--attention cudnn: that kernel does not run on cpu.*one of .*math"):
        att.attention_backends("cudnn", cpu)
    with pytest.raises(UserError, match="not one of"):
        att.attention_backends("fastest", cpu)


@pytest.mark.parametrize("name", ["math", "flash"])
def test_enabled_backend_matches_math(name):
    if not att.runs(name, torch.device("cpu"), torch.float32, 16):
        pytest.skip(f"{name} does not run on this CPU build")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
    with att.enabled(att.attention_backends(name, "cpu", torch.float32, 16)):
        out = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, ref, atol=1e-5)


def test_applied_to_the_dit_runs_its_forwards_under_the_backend(monkeypatch):
    """Every attention call of a prefill and two block forwards runs with only math enabled; outside
    them the flags are untouched; the velocities equal the unwrapped model's."""
    torch.manual_seed(0)
    model = CausalS2VDiT(TINY.dit).eval()
    ref = run_blocks(model, TINY.dit, n_blocks=2)[0]
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert att.apply_attention_backend(model, "math", "cpu", torch.float32) == [att.BACKENDS["math"]]
    out = run_blocks(model, TINY.dit, n_blocks=2)[0]
    assert len(seen) > 10 and not any(seen)
    assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.allclose(out, ref, atol=1e-5)


def test_generate_refuses_a_backend_the_device_lacks(capsys, tmp_path):
    rc = main(["generate", "--preset", "tiny", "--device", "cpu", "--attention", "cudnn",
               "--save_file", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "--attention cudnn" in err
    assert not list(tmp_path.iterdir())
