"""The front of the engine: speech in, block tasks out.

The frontend owns a session's speech stream and audio feature stream and its task plan. It knows how
long the video is (as soon as the speech length is known), whether the next block can start (its
audio features and muxed audio have arrived), and makes each block's task in order: noise, audio
features, rolling-sink distances, and which of the block's decoded frames go into the video with the
speech samples that play with them (the first 3 frames of the video are dropped; the last block is
cut at the end of the speech). Every scheduler (the single-process session, the multi-GPU pipeline)
asks it for tasks; only the frontend reads speech.
"""

from __future__ import annotations

import numpy as np

from liveavatar.engine.audio_features import AudioFeatures
from liveavatar.engine.speech import SpeechStream
from liveavatar.engine.task import (
    DROP_FIRST_FRAMES,
    BlockTask,
    StreamLength,
    TaskPlan,
    samples_before_block,
    stream_length,
)


class Frontend:
    def __init__(self, speech: SpeechStream, features: AudioFeatures, plan: TaskPlan, *, infer_frames: int,
                 num_clip: int | None, audio_offset_frames: int, fps: int, sample_rate: int):
        self.speech, self.features, self.plan = speech, features, plan
        self.infer_frames, self.num_clip, self.offset = infer_frames, num_clip, audio_offset_frames
        self.fps, self.sr = fps, sample_rate
        self.frames_per_block = 4 * plan.frames_per_block  # video frames a block decodes to
        self.next_block = 0  # the next block to make a task for
        self.emitted = 0  # output frames assigned to tasks so far

    # -- speech in ---------------------------------------------------------------------------------

    def push(self, samples) -> None:
        self.speech.push(samples)

    def end(self) -> None:
        self.speech.end()

    # -- length ------------------------------------------------------------------------------------

    @property
    def length(self) -> StreamLength | None:
        """Clips, blocks and frames of the whole video, once the speech length is known."""
        total = self.speech.total
        if total is None:
            return None
        return stream_length(total, self.infer_frames, self.num_clip, self.fps, self.plan.frames_per_block, self.sr)

    def exists(self, n: int) -> bool | None:
        """Whether block n is part of the video (None: not known until more speech arrives)."""
        if self.num_clip is not None and n >= self.num_clip * self.plan.blocks_per_clip:
            return False
        if n == 0:
            return True
        threshold = samples_before_block(n, self.fps, self.plan.frames_per_block, self.sr)
        if not self.speech.have(threshold + 1):
            return None
        return n < self.length.num_blocks if self.length is not None else True

    @property
    def done(self) -> bool:
        return self.exists(self.next_block) is False

    def mux_start(self, frame: int) -> int:
        """Speech sample that plays with output frame `frame`."""
        return self.offset * self.sr // self.fps + frame * self.sr // self.fps

    def ready(self) -> bool | None:
        """True when the next block can start now, False when the video is complete, None when it needs
        more speech (a pull source is read as far as needed)."""
        n = self.next_block
        exists = self.exists(n)
        if exists is False:
            return False
        end = self.frames_per_block * (n + 1)
        if exists and self.features.ready(end) and self.speech.have(self.mux_start(end - DROP_FIRST_FRAMES)):
            return True
        return None

    def wait(self, timeout: float = 1.0) -> None:
        """Block until more speech arrives (pushed from another thread) or the stream ends."""
        self.speech.wait(timeout)

    # -- tasks -------------------------------------------------------------------------------------

    def _frame_limit(self) -> int | None:
        if self.length is not None:
            return self.length.num_frames
        if self.num_clip is not None:
            return self.num_clip * self.infer_frames - DROP_FIRST_FRAMES
        return None

    def take(self) -> BlockTask:
        """The next block's task (call when `ready()` is True); advances the stream."""
        n, per = self.next_block, self.frames_per_block
        lo = DROP_FIRST_FRAMES if n == 0 else 0
        count = per - lo
        limit = self._frame_limit()
        if limit is not None:
            count = max(0, min(count, limit - self.emitted))
        e0, e1 = self.emitted, self.emitted + count
        task = self.plan.task(n, self.features.frames(per * n, per * (n + 1)), video_start=e0, keep=(lo, lo + count),
                              speech=self.speech.read(self.mux_start(e0), self.mux_start(e1)))
        self.next_block, self.emitted = n + 1, e1
        self.speech.release(min(self.features.keep_from(), self.mux_start(self.emitted)))
        return task

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        speech = self.speech.state_dict()
        return {"next_block": self.next_block, "emitted": self.emitted,
                "speech": dict(speech, samples=np.asarray(speech["samples"])), "features": self.features.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.next_block, self.emitted = int(state["next_block"]), int(state["emitted"])
        self.speech.load_state_dict(state["speech"])
        self.features.load_state_dict(state["features"])


__all__ = ["Frontend"]
