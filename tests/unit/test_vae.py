"""The Wan2.1 VAE: checkpoint layout, parity with the official module, streaming decode and shape rules.

Parity uses tests/fixtures/official_tiny_vae.pt (outputs of the official `WanVAE_` at dim=8, see
PARITY.md §2); the full-size layout is checked against the manifest of the real `Wan2.1_VAE.pth`.
Streaming is checked against one-shot decode bit for bit, and the analytic state size against the
bytes a real state holds.
"""

import json
from pathlib import Path

import pytest
import torch

from liveavatar.config import VAEConfig
from liveavatar.errors import UserError
from liveavatar.models.vae import VAEStreamState, WanVAE, stream_state_nbytes

FIX = Path(__file__).resolve().parents[1] / "fixtures"
TOL = 1e-4
TINY = VAEConfig(dim=8)


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIX / "official_tiny_vae.pt", weights_only=True)


@pytest.fixture(scope="module")
def vae(fixture):
    model = WanVAE(TINY)
    model.load_state_dict(fixture["state_dict"], strict=True, assign=True)
    return model.eval()


def _errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """max abs error, max abs error / max |reference|, max elementwise relative error (|ref| > 1e-2)."""
    a, b = a.double(), b.double()
    d = (a - b).abs()
    big = b.abs() > 1e-2
    return d.max().item(), (d.max() / b.abs().max()).item(), (d[big] / b.abs()[big]).max().item()


def test_full_size_layout_matches_checkpoint_manifest():
    manifest = json.loads((FIX / "vae_wan2_1.json").read_text())
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    sd = model.state_dict()
    got = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()}
    assert got == manifest["tensors"]
    assert len(sd) == manifest["_meta"]["num_tensors"] == 194
    assert sum(v.numel() for v in sd.values()) == manifest["_meta"]["num_params"] == 126_892_531


def test_encode_matches_official(vae, fixture):
    mu = vae.encode_raw(fixture["inputs"]["video"])
    ref = fixture["outputs"]["encode_mean"]
    assert mu.shape == ref.shape and mu.dtype == torch.float32
    abs_err, rel_max, rel_elem = _errors(mu, ref)
    print(f"encode_mean: max abs {abs_err:.3e}, max abs / max|ref| {rel_max:.3e}, "
          f"max elementwise rel {rel_elem:.3e}")
    assert abs_err <= TOL


def test_decode_matches_official(vae, fixture):
    video = vae.decode_raw(fixture["inputs"]["latent"])
    ref = fixture["outputs"]["decode"]
    assert video.shape == ref.shape and video.dtype == torch.float32
    abs_err, rel_max, rel_elem = _errors(video, ref)
    print(f"decode: max abs {abs_err:.3e}, max abs / max|ref| {rel_max:.3e}, "
          f"max elementwise rel {rel_elem:.3e}")
    assert abs_err <= TOL


def test_normalised_wrappers(vae, fixture):
    mean = torch.tensor(TINY.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(TINY.latent_std).view(1, -1, 1, 1, 1)
    z = vae.encode(fixture["inputs"]["video"])
    assert torch.allclose(z, (fixture["outputs"]["encode_mean"] - mean) / std, atol=TOL)
    lat = fixture["inputs"]["latent"]
    assert torch.allclose(vae.decode((lat - mean) / std), fixture["outputs"]["decode"], atol=TOL)


@pytest.mark.parametrize("chunks", [(1, 1, 1), (2, 1), (1, 2), (3,), (1, 3, 1)])
def test_stream_decode_is_bit_identical(vae, chunks):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(1, 16, sum(chunks), 4, 6, generator=g)
    ref = vae.decode(z)
    state = VAEStreamState()
    parts, start, sizes = [], 0, []
    for n in chunks:
        parts.append(vae.decode_stream(z[:, :, start : start + n], state))
        start += n
        if start >= 2:
            sizes.append(state.nbytes)
    assert [p.shape[2] for p in parts] == [4 * n - 3 * (i == 0) for i, n in enumerate(chunks)]
    assert torch.equal(torch.cat(parts, 2), ref)
    # the state stops growing after two latent frames and matches the analytic size
    expected = stream_state_nbytes(TINY, 4, 6, torch.float32)
    assert sizes and all(s == expected for s in sizes)


def test_stream_state_bytes_batch_and_dtype(vae):
    state = VAEStreamState()
    z = torch.randn(2, 16, 2, 3, 5, generator=torch.Generator().manual_seed(1))
    vae.decode_stream(z, state)
    assert state.nbytes == stream_state_nbytes(TINY, 3, 5, torch.float32, batch=2)
    assert stream_state_nbytes(TINY, 3, 5, torch.bfloat16, batch=2) * 2 == state.nbytes
    shapes = [tuple(c.shape) for c in state.caches]
    assert len(shapes) == vae.decoder.num_slots and all(s[0] == 2 and s[2] == 2 for s in shapes)


def test_full_size_state_bytes():
    # 704x384 pixels -> 88x48 latents: about 1.28 GB of bf16 decoder caches (architecture.md §7)
    assert abs(stream_state_nbytes(VAEConfig(), 88, 48, torch.bfloat16) / 1e9 - 1.278) < 1e-3


@pytest.mark.parametrize(("frames", "latents"), [(1, 1), (5, 2), (9, 3)])
def test_encode_shape_rule(vae, frames, latents):
    video = torch.rand(1, 3, frames, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert vae.encode(video).shape == (1, 16, latents, 2, 3)


def test_encode_rejects_bad_frame_count(vae):
    with pytest.raises(UserError):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))


@pytest.mark.parametrize("c_in,c_out,t,h,w,kernel,padding,path", [
    (8, 8, 1, 48, 40, 3, 1, "_folded_2d"),            # one output frame: folded 2-D conv
    (16, 32, 1, 20, 13, 3, 1, "_folded_2d"),          # odd sizes, widening
    (8, 8, 4, 32, 24, 3, 1, "_time_in_batch"),        # several output frames: windows as a batch
    (32, 64, 2, 16, 16, (3, 1, 1), (1, 0, 0), "_time_in_batch"),  # temporal-only kernel (the time upsampler's)
    (8, 8, 3, 8, 8, 3, 1, None),                      # below the size where the reference kernel is kept
])
def test_cpu_conv_paths_equal_plain_conv3d(c_in, c_out, t, h, w, kernel, padding, path, monkeypatch):
    """The CPU fast paths of the causal conv (chosen where PyTorch would run its slow reference
    conv3d) compute the same convolution as a plain conv3d over the causally padded input, also for
    the cache it leaves for the next chunk."""
    from torch import nn

    from liveavatar.models.vae import CausalConv3d

    taken = []
    for name in ("_folded_2d", "_time_in_batch"):
        real = getattr(CausalConv3d, name)
        monkeypatch.setattr(CausalConv3d, name,
                            lambda self, x, _real=real, _name=name: taken.append(_name) or _real(self, x))
    torch.manual_seed(0)
    conv = CausalConv3d(c_in, c_out, kernel, padding=padding)
    conv.slot = 0
    prev = torch.randn(1, c_in, 2, h, w)
    x = torch.randn(1, c_in, t, h, w)
    caches = [prev.clone()]
    y = conv(x, caches)
    ref = nn.Conv3d.forward(conv, torch.cat([prev, x], 2))
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(caches[0], torch.cat([prev, x], 2)[:, :, -2:])
    assert taken == ([path] if path else [])
