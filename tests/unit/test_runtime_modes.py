"""Runtime modes give the resident model's output on the tiny preset, with the device emulated on the
CPU: block streaming, host-staged KV caches and the shared sink bit for bit, FP8 weights within FP8 tolerance."""

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from liveavatar.engine.pipeline import Pipeline
from liveavatar.engine.session import GenerationOptions
from liveavatar.runtime.kv_cache import HostRingKVCache, StagedRingKVCache
from liveavatar.runtime.memory import RuntimeConfig

OPTS = GenerationOptions(size=128 * 128, num_clip=2, seed=11)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("modes")
    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(d / "face.png")
    t = np.arange(16000 * 4) / 16000  # long enough for two clips: the sink refresh and ring wrap run
    sf.write(d / "speech.wav", (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 16000)
    return str(d / "face.png"), str(d / "speech.wav")


def _rings(session):
    return [ring for stage in session.denoise for ring in stage.rings.values()]


def _latents(inputs, runtime):
    pipe = Pipeline.tiny(seed=0, runtime=runtime)
    session = pipe.session(inputs[0], inputs[1], "a person talking", OPTS)
    return session, torch.cat(list(session.latents()), dim=2)


@pytest.fixture(scope="module")
def resident(inputs):
    return _latents(inputs, RuntimeConfig())[1]


@pytest.mark.parametrize("runtime", [
    RuntimeConfig(resident_blocks=0),
    RuntimeConfig(resident_blocks=2, kv_on_device=1),
    RuntimeConfig(kv_on_device=0, t5_cpu=True, offload_model=False),
    RuntimeConfig(kv_sink="shared"),
    RuntimeConfig(kv_sink="shared", kv_on_device=2, resident_blocks=1),
], ids=["stream-all", "stream-half+kv-host", "kv-host+t5-cpu", "sink-shared", "sink-shared+kv-host+stream"])
def test_streaming_and_kv_placement_are_bit_identical(inputs, resident, runtime):
    """Two clips: the rings wrap and the sink is refreshed (prefilled again) on the way."""
    session, z = _latents(inputs, runtime)
    rings = _rings(session)
    n_host = sum(isinstance(r, HostRingKVCache) for r in rings)
    assert n_host == (0 if runtime.kv_on_device is None else 4 - runtime.kv_on_device)
    shared = [r for r in rings if isinstance(r, StagedRingKVCache)]
    assert len(shared) == (4 - n_host if runtime.sink_shared else 0)
    for ring in shared:  # ring tokens only, attended through the stage's one staging buffer of ring + sink
        assert ring.k.shape[2] == ring.ring_len and ring.staging is shared[0].staging
        assert ring.staging[0].shape[1] == ring.ring_len + session.layout.num_tokens
    assert (session.pipe.streamer is not None) == (runtime.resident_blocks is not None)
    assert torch.equal(z, resident)


def test_fp8_weights_stay_within_fp8_tolerance(inputs, resident):
    _, z = _latents(inputs, RuntimeConfig(fp8=True))
    rel = ((z - resident).norm() / resident.norm()).item()
    assert 0 < rel < 0.05, rel  # FP8 changes the numbers, but only by quantisation noise


def test_fp8_kv_cache_stays_within_fp8_tolerance(inputs, resident):
    from liveavatar.runtime.kv_cache import FP8RingKVCache

    session, z = _latents(inputs, RuntimeConfig(kv_fp8=True, kv_on_device=3))
    assert [type(r) for r in _rings(session)] == [FP8RingKVCache] * 3 + [HostRingKVCache]
    rel = ((z - resident).norm() / resident.norm()).item()
    assert 0 < rel < 0.05, rel


def test_fp8_with_streaming_equals_fp8_resident(inputs):
    _, a = _latents(inputs, RuntimeConfig(fp8=True))
    _, b = _latents(inputs, RuntimeConfig(fp8=True, resident_blocks=1, kv_on_device=2))
    assert torch.equal(a, b)
