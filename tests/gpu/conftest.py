"""tests/gpu: the CUDA-only paths, each checked against the CPU or eager result (`python -m pytest
tests/gpu`). Everything here is skipped without a CUDA device, so the folder collects cleanly on CPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # tiny_dit helpers


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(skip)


def needs_fp8_tensor_cores():
    return pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                              reason="needs compute capability >= 8.9 (FP8 tensor cores)")


def tiny_frames(device: str, runtime=None, blocks_hook=None, seed: int = 0, clips: int = 1):
    """uint8 frames of a tiny-preset generation on `device` (bundled face and speech, 128x128 area)."""
    from liveavatar import GenerationOptions, Pipeline
    from liveavatar.io import media

    pipe = Pipeline.tiny(device=device, runtime=runtime)
    if blocks_hook is not None:
        for block in pipe.dit.blocks:
            block.register_forward_pre_hook(blocks_hook)
    opts = GenerationOptions(size=128 * 128, num_clip=clips, seed=seed)
    with pipe.session(str(media.example_image_path()), str(media.example_audio_path()), "a person talking",
                      opts) as session:
        frames = torch.cat([torch.as_tensor(c.frames) for c in session])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return frames
