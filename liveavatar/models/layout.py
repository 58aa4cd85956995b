"""Token layout of the streaming DiT at one latent size.

A latent frame of h x w becomes (h/2)(w/2) tokens (patch 1x2x2). The sink sequence is the reference
frame followed by the FramePack motion tokens (newest latent at full resolution, the next 2 at 1/2,
the oldest 16 at 1/4), each group with its own RoPE grid. `SinkLayout` gives the group sizes and
RoPE factors; it depends only on the latent size, so caches and the memory planner size themselves
from it before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from liveavatar.config import DiTConfig
from liveavatar.models.rope import grid_factors, sample_positions


@dataclass(frozen=True)
class SinkLayout:
    """Token groups of the sink sequence at latent size (h, w): ref, then motion post / 2x / 4x."""

    h: int  # latent height
    w: int  # latent width
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)

    @property
    def fs(self) -> int:
        return (self.h // 2) * (self.w // 2)

    @property
    def group_sizes(self) -> tuple[int, int, int, int]:
        h, w = self.h, self.w
        n4 = self.zip_frame_buckets[2] // 4
        return self.fs, self.fs, (h // 4) * (w // 4), n4 * (h // 8) * (w // 8)

    @property
    def num_tokens(self) -> int:
        return sum(self.group_sizes)

    def rope(self, cfg: DiTConfig, ref_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [num_tokens, d/2] with the reference frame at temporal position `ref_pos`."""
        h2, w2 = self.h // 2, self.w // 2
        b1, b2, b16 = self.zip_frame_buckets
        n4 = b16 // 4
        grids = [
            ([ref_pos], range(h2), range(w2)),  # reference image
            ([-b1], range(h2), range(w2)),  # newest motion frame, full resolution
            ([-(b1 + b2)], sample_positions(0, h2, self.h // 4), sample_positions(0, w2, self.w // 4)),
            # 4x bucket: n4 frames sampled from oldest (-(b1+b2+b16)) towards newer, e.g. -19,-14,-9,-4.
            ([-p for p in np.linspace(b1 + b2 + b16, b1 + b2 + 1 , n4).astype(int).tolist()],
             sample_positions(0, h2, self.h // 8), sample_positions(0, w2, self.w // 8)),
        ]
        parts = [grid_factors(t, list(hh), list(ww), cfg.rope_split) for t, hh, ww in grids]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
