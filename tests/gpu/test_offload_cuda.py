"""Page-locked host memory and side streams: `pin_in_place` registers host tensors; block streaming and
host-staged ring caches give the resident GPU run's frames exactly, also when the compute stream is
slowed down (a GPU sleep before every block), which would expose a copy that does not wait for its
event; the GPU run is close to the CPU run."""

import torch
from conftest import tiny_frames

from liveavatar.runtime.memory import RuntimeConfig
from liveavatar.runtime.offload import pin_in_place, unpin


def test_pin_in_place_registers_the_tensor():
    t = torch.randn(1 << 20)
    pinned = pin_in_place(t)
    assert pinned.is_pinned()
    if pinned is t:  # registered in place, at its exact size
        unpin([t])
        assert not t.is_pinned()


def _slow(module, args):
    torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time on the compute stream before each block


def test_streaming_and_host_kv_equal_resident():
    resident = tiny_frames("cuda", RuntimeConfig())
    for rt in (RuntimeConfig(resident_blocks=1), RuntimeConfig(kv_on_device=0),
               RuntimeConfig(resident_blocks=0, kv_on_device=1)):
        assert torch.equal(tiny_frames("cuda", rt), resident), rt
        assert torch.equal(tiny_frames("cuda", rt, blocks_hook=_slow), resident), f"{rt} with a slow compute stream"


def test_gpu_run_is_close_to_cpu_run():
    gpu = tiny_frames("cuda").float()
    cpu = tiny_frames("cpu").float()
    assert gpu.shape == cpu.shape
    assert (gpu - cpu).abs().mean() < 1.0  # mean difference under one 8-bit level
