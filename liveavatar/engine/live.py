"""The frontend of a live session: speech arrives as utterances; between them the avatar stays alive.

A live session never ends by itself. Its timeline is a run of blocks; an utterance (speech pushed
by a TTS or a microphone, ended by `end()`) starts at the next block boundary after it is queued and
covers as many blocks as its speech needs; blocks with no utterance are idle: silent audio features
and silent sound, so the avatar keeps moving without speaking. Each utterance's features come from
its own speech stream (`AudioFeatures`, one-pass or windowed as the options say), as if it were a
whole file: an utterance that starts a session gives exactly the frames `liveavatar generate` gives
for that speech. While an utterance is open (pushed but not ended) and its next block's audio has not
arrived, the session waits rather than filling silence into the middle of a sentence.

`barge_in()` drops the utterance playing and every queued one at once: the next block is idle, and
no dropped sample is ever muxed.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from liveavatar.engine.audio_features import AudioFeatures
from liveavatar.engine.speech import SpeechStream
from liveavatar.engine.task import BlockTask, TaskPlan, samples_before_block, stream_length

MIN_UTTERANCE = 800  # samples (50 ms): shorter utterances are dropped


class Utterance:
    def __init__(self, features: AudioFeatures):
        self.features, self.speech = features, features.speech
        self.start: int | None = None  # the block it starts at, once it plays

    def blocks(self, fps: int, frames_per_block: int, sr: int) -> int | None:
        """Blocks it covers, once its length is known."""
        total = self.speech.total
        return None if total is None else stream_length(total, fps=fps, frames_per_block=frames_per_block,
                                                        sample_rate=sr, infer_frames=4 * frames_per_block).num_blocks


class LiveFrontend:
    """Makes the block tasks of a live session (same interface as `Frontend`)."""

    def __init__(self, make_features, plan: TaskPlan, *, fps: int, sample_rate: int, audio_layers: int,
                 audio_dim: int, dtype: torch.dtype):
        """make_features(speech) -> AudioFeatures over that speech stream."""
        self.make_features, self.plan, self.fps, self.sr = make_features, plan, fps, sample_rate
        self.frames_per_block = 4 * plan.frames_per_block
        self.silent_features = torch.zeros(1, audio_layers, audio_dim, self.frames_per_block, dtype=dtype)
        self.playing: Utterance | None = None
        self.queue: list[Utterance] = []  # pushed, not started; the last may still be open
        self.next_block = 0
        self.emitted = 0
        self.idle_blocks = 0
        self.spoken: dict[int, bool] = {}  # recent blocks: whether each carries speech
        self._lock = threading.RLock()
        self._arrival = threading.Condition(self._lock)

    # -- speech in -----------------------------------------------------------------------------------

    def _last(self) -> Utterance | None:
        """The newest utterance: the last queued one, else the one playing."""
        return self.queue[-1] if self.queue else self.playing

    def _open(self) -> Utterance:
        last = self._last()
        if last is None or last.speech.eos:
            last = Utterance(self.make_features(SpeechStream()))
            self.queue.append(last)
        return last

    def push(self, samples) -> None:
        """Append 16 kHz mono samples to the open utterance (opening one if none is)."""
        with self._lock:
            self._open().speech.push(samples)
            self._arrival.notify_all()

    def end(self) -> None:
        """The open utterance is complete."""
        with self._lock:
            last = self._last()
            if last is not None and not last.speech.eos:
                last.speech.end()
            self._arrival.notify_all()

    def barge_in(self) -> int:
        """Drop the utterance playing and every queued one; returns how many were dropped."""
        with self._lock:
            dropped = len(self.queue) + (self.playing is not None)
            self.playing, self.queue = None, []
            self._arrival.notify_all()
            return dropped

    @property
    def speaking(self) -> bool:
        """An utterance is playing or queued."""
        return self.playing is not None or bool(self.queue)

    def block_speaks(self, index: int) -> bool:
        """Whether block `index` (one of the last 64 made) carries speech."""
        return self.spoken.get(index, False)

    # -- tasks ---------------------------------------------------------------------------------------

    length = None  # a live stream has no length
    done = False

    def _covering(self, n: int) -> tuple[Utterance | None, bool]:
        """(the utterance block n belongs to, whether that is known yet)."""
        u = self.playing
        if u is not None:
            local = n - u.start
            blocks = u.blocks(self.fps, self.plan.frames_per_block, self.sr)
            if blocks is not None:
                if local < blocks:
                    return u, True
                self.playing = None  # finished
            elif u.speech.have(samples_before_block(local, self.fps, self.plan.frames_per_block, self.sr) + 1):
                return u, True
            else:
                return u, False  # still being pushed: wait for it rather than fill silence
        while self.queue and self.queue[0].speech.eos and self.queue[0].speech.arrived < MIN_UTTERANCE:
            self.queue.pop(0)  # too short to hear (and for wav2vec2): skipped
        if self.queue:
            u = self.queue[0]
            if u.speech.arrived < MIN_UTTERANCE and not u.speech.eos:
                return None, False
            self.queue.pop(0)
            u.start, self.playing = n, u
            return u, True
        return None, True

    def ready(self) -> bool | None:
        """True when the next block can start now (idle blocks always can), None while an utterance's
        audio is still due. Never False: a live stream does not end."""
        with self._lock:
            u, known = self._covering(self.next_block)
            if not known:
                return None
            if u is None:
                return True
            local_end = self.frames_per_block * (self.next_block - u.start + 1)
            if u.features.ready(local_end) and u.speech.have(local_end * self.sr // self.fps):
                return True
            return None

    def wait(self, timeout: float = 1.0) -> None:
        with self._lock:
            self._arrival.wait(timeout)

    def take(self) -> BlockTask:
        """The next block's task (call when `ready()` is True)."""
        with self._lock:
            n, per = self.next_block, self.frames_per_block
            u, _ = self._covering(n)
            lo = 3 if n == 0 else 0  # the first 3 frames of a stream are dropped, as in every session
            if u is None:
                audio, speech = self.silent_features, np.zeros((per - lo) * self.sr // self.fps, np.float32)
                self.idle_blocks += 1
            else:
                local = n - u.start
                audio = u.features.frames(per * local, per * (local + 1))
                a0, a1 = (per * local + lo) * self.sr // self.fps, per * (local + 1) * self.sr // self.fps
                speech = u.speech.read(a0, a1)
                u.speech.release(min(u.features.keep_from(), a1))
            task = self.plan.task(n, audio, video_start=self.emitted, keep=(lo, per), speech=speech)
            self.spoken[n] = u is not None
            self.spoken.pop(n - 64, None)
            self.next_block, self.emitted = n + 1, self.emitted + per - lo
            return task

    def state_dict(self) -> dict:
        from liveavatar.errors import UserError

        raise UserError("a live session cannot be saved: it is a conversation, not a render")


__all__ = ["LiveFrontend", "Utterance"]
