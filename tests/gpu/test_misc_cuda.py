"""CUDA-only odds and ends: the GPU is in the planner's table, `--attention` backends agree with math,
and a CUDA out-of-memory error in `generate` is reported with the plan table in one error line."""

import pytest
import torch
import torch.nn.functional as F

from liveavatar.runtime import attention as att


def test_this_gpu_is_in_the_table():
    from liveavatar.runtime.gpus import from_device

    spec = from_device()
    assert spec.known, f"{torch.cuda.get_device_name()} is not in runtime/gpus.py: add it"
    assert spec.has_fp8 == (torch.cuda.get_device_capability() >= (8, 9))


def test_attention_backends_agree_with_math():
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8, 300, 128, device=dev, generator=g).bfloat16() for _ in range(3))
    with att.enabled(att.attention_backends("math", dev)):
        ref = F.scaled_dot_product_attention(q, k, v).float()
    auto = att.attention_backends("auto", dev)
    assert auto and auto[-1] == att.BACKENDS["math"]
    if torch.cuda.get_device_capability() >= (9, 0) and att.runs("cudnn", dev):
        assert auto[0] == att.BACKENDS["cudnn"]
    ran = 0
    for name in ("cudnn", "flash", "efficient"):
        if not att.runs(name, dev):
            continue
        ran += 1
        with att.enabled(att.attention_backends(name, dev)):
            out = F.scaled_dot_product_attention(q, k, v).float()
        assert (out - ref).abs().max() < 2e-2, name
    assert ran >= 1


def test_oom_is_reported_with_the_plan(capsys, monkeypatch, tmp_path):
    from liveavatar.cli import main
    from liveavatar.engine.pipeline import Pipeline

    def exhaust(self, *args, **kwargs):
        torch.empty(1 << 50, dtype=torch.uint8, device=self.device)  # a real CUDA allocation failure

    monkeypatch.setattr(Pipeline, "session", exhaust)
    rc = main(["generate", "--preset", "tiny", "--device", "cuda", "--gpu_memory", "4", "--size", "128*128",
               "--save_file", str(tmp_path / "out.mp4")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "peak (max of setup, steady)" in err and "ran out of memory" in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]
    torch.cuda.set_per_process_memory_fraction(1.0)  # generate capped the allocator at --gpu_memory
    torch.cuda.empty_cache()


@pytest.mark.parametrize("name", ["flash", "efficient", "cudnn"])
def test_requested_backend_that_does_not_run_is_one_error(name):
    dev = torch.device("cuda")
    if att.runs(name, dev, torch.float32, 16):
        pytest.skip(f"{name} runs here")
    with pytest.raises(Exception, match=f"--attention {name}"):
        att.attention_backends(name, dev, torch.float32, 16)
