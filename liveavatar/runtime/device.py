"""Moving host tensors to the compute device without stalling the host."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor -> `device` without a host sync: through pinned memory, non-blocking, on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


__all__ = ["to_device"]
