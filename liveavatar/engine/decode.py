"""The decode stage: the VAE and its streaming state on one device; clean latents in, frames out.

The streaming decoder is warmed up on the first 7 motion latents (their frames are discarded), as
the official streaming pipeline does; after that every block of 3 latents gives 12 RGB frames. The
decoder's causal-convolution caches are an explicit `VAEStreamState`, so the stage can be saved,
restored and moved to its own device or process.
"""

from __future__ import annotations

import numpy as np
import torch

from liveavatar.models.vae import VAEStreamState, WanVAE

VAE_WARMUP_LATENTS = 7  # motion latents decoded (and discarded) to prime the streaming decoder


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 (clamped, truncated like the official writer)."""
    x = ((video.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


class DecodeStage:
    def __init__(self, vae: WanVAE, device):
        self.vae, self.device = vae, torch.device(device)
        self.state = VAEStreamState()

    def start(self, motion_latents: torch.Tensor) -> None:
        """Prime the decoder on the motion latents [1, C, T_m, h, w]."""
        self.state = VAEStreamState()
        with torch.no_grad():
            self.vae.decode_stream(motion_latents[:, :, :VAE_WARMUP_LATENTS].to(self.device), self.state)

    def __call__(self, z: torch.Tensor) -> np.ndarray:
        """Clean latents [1, C, F, h, w] -> frames [4F, H, W, 3] uint8."""
        with torch.no_grad():
            return to_uint8(self.vae.decode_stream(z.to(self.device), self.state)[0])

    def state_dict(self) -> dict:
        return {"caches": list(self.state.caches), "started": self.state.started}

    def load_state_dict(self, state: dict) -> None:
        caches = [None if c is None else c.to(self.device) for c in state["caches"]]
        self.state = VAEStreamState(caches, bool(state["started"]))

    def close(self) -> None:
        self.state = VAEStreamState()


__all__ = ["DecodeStage", "VAE_WARMUP_LATENTS", "to_uint8"]
