"""Block tasks: what one block of the stream needs, derived from (seed, block, step) alone.

The video is made of blocks of `frames_per_block` latent frames (3 latents = 12 video frames);
`blocks_per_clip` blocks form a clip (4 at 48 frames a clip). For block n a `BlockTask` carries its
index, its first latent frame F0 = 3n, its initial noise (slice b = n mod 4 of the clip noise drawn
from `seed + clip`, as the official pipeline draws it), its audio features, the rolling-sink
distance d of each denoising step, and whether the sink refresh happens before it (the first block
of clip 1). Nothing here depends on the order in which tasks are made, so any split of the steps
across stages or processes gives the same video.

The distances are the draws `randint(lo, hi)` of Python's `random.Random(seed)`, the (S·n + i)-th
for step i of block n (S steps a block): the sequence the engine has always used, so a seed keeps
its video. `SinkDistances` replays that sequence with a forward-only cursor (one byte of state, no
history kept), which makes it a pure function of (seed, block, step) at amortised O(1) cost when
blocks are asked for in order; asking for an earlier block restarts the replay.

This module also holds the stream length rules (`StreamLength`): how many clips, blocks and output
frames a speech of a given length gives.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

DROP_FIRST_FRAMES = 3  # frames dropped at the start of the video, as the official pipelines do


class SinkDistances:
    """d(block, step) for a seed: the (steps·block + step)-th `randint(lo, hi)` of `random.Random(seed)`."""

    def __init__(self, seed: int, steps: int, lo: int, hi: int):
        self.seed, self.steps, self.lo, self.hi = seed, steps, lo, hi
        self._rng, self._next = random.Random(seed), 0

    def __call__(self, block: int, step: int) -> int:
        index = self.steps * block + step
        if index < self._next:
            self._rng, self._next = random.Random(self.seed), 0
        while self._next < index:
            self._rng.randint(self.lo, self.hi)
            self._next += 1
        self._next += 1
        return self._rng.randint(self.lo, self.hi)


@dataclass(frozen=True)
class BlockTask:
    index: int  # block n
    frame_start: int  # first latent frame F0 = frames_per_block · n
    noise: torch.Tensor  # [1, C, F, h, w] initial latents (host memory, latent dtype)
    audio: torch.Tensor  # [1, 25, C_a, 4·F] audio features of the block's video frames (host memory)
    distances: tuple[int, ...]  # rolling-sink distance d of each denoising step
    refresh_sink: bool  # every denoise stage re-prefills its sink with the first generated latent first
    video_start: int = 0  # index in the output video of the first kept frame
    keep: tuple[int, int] = (0, 0)  # which of the block's decoded frames go into the video
    speech: np.ndarray | None = None  # float32 16 kHz samples that play with the kept frames


class TaskPlan:
    """Makes the block tasks of one stream: noise and distances from the seed, audio given per block."""

    def __init__(self, seed: int, steps: int, latent_shape: tuple[int, int, int], dtype: torch.dtype,
                 frames_per_block: int, blocks_per_clip: int, d_range: tuple[int, int], sink_refresh: bool = True):
        """latent_shape: (C, h, w)."""
        self.seed, self.latent_shape, self.dtype = seed, latent_shape, dtype
        self.frames_per_block, self.blocks_per_clip = frames_per_block, blocks_per_clip
        self.sink_refresh = sink_refresh
        self.distances = SinkDistances(seed, steps, *d_range)
        self.steps = steps
        self._clip: tuple[int, torch.Tensor] | None = None  # the last clip's noise, shared by its blocks

    def clip_noise(self, clip: int) -> torch.Tensor:
        """[1, C, blocks_per_clip · F, h, w] noise of a clip: CPU generator seeded with (seed + clip) mod 2^63."""
        if self._clip is None or self._clip[0] != clip:
            c, h, w = self.latent_shape
            gen = torch.Generator("cpu").manual_seed((self.seed + clip) % 2**63)
            z = torch.randn(1, c, self.blocks_per_clip * self.frames_per_block, h, w, generator=gen)
            self._clip = (clip, z.to(self.dtype))
        return self._clip[1]

    def noise(self, n: int) -> torch.Tensor:
        clip, b = divmod(n, self.blocks_per_clip)
        f = self.frames_per_block
        return self.clip_noise(clip)[:, :, f * b: f * (b + 1)]

    def task(self, n: int, audio: torch.Tensor, **output) -> BlockTask:
        """Block n's task; `output`: its video_start, keep and speech (from the frontend)."""
        return BlockTask(n, self.frames_per_block * n, self.noise(n), audio,
                         tuple(self.distances(n, i) for i in range(self.steps)),
                         self.sink_refresh and n == self.blocks_per_clip, **output)


@dataclass(frozen=True)
class StreamLength:
    num_clips: int
    num_blocks: int
    num_frames: int  # frames in the output video


def stream_length(num_samples: int, infer_frames: int = 48, num_clip: int | None = None, fps: int = 25,
                  frames_per_block: int = 3, sample_rate: int = 16000) -> StreamLength:
    """Clips, blocks and output frames for a speech of `num_samples` at 16 kHz.

    As many clips as the speech needs, the video trimmed to the speech (the first 3 generated frames
    are dropped). `num_clip` N caps that, as in the official scripts (whose `--num_clip 10000` means
    "the whole audio"): when the speech needs more than N clips, exactly 48·N − 3 frames."""
    f = infer_frames
    audio_frames = math.ceil(num_samples * fps / sample_rate)
    needed = max(1, math.ceil(audio_frames / f))
    if num_clip is not None and num_clip < needed:
        clips, frames = num_clip, num_clip * f - DROP_FIRST_FRAMES
    else:
        clips, frames = needed, max(1, min(needed * f, audio_frames) - DROP_FIRST_FRAMES)
    per_block = 4 * frames_per_block
    blocks = min(clips * f // per_block, math.ceil((frames + DROP_FIRST_FRAMES) / per_block))
    return StreamLength(clips, blocks, frames)


def samples_before_block(n: int, fps: int = 25, frames_per_block: int = 3, sample_rate: int = 16000) -> int:
    """Samples a speech must have *more than* for block n to exist (its first video frame lies in it)."""
    return 4 * frames_per_block * n * sample_rate // fps


__all__ = ["BlockTask", "DROP_FIRST_FRAMES", "SinkDistances", "StreamLength", "TaskPlan", "samples_before_block",
           "stream_length"]
