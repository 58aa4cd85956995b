"""Speech as a stream: 16 kHz mono samples that arrive over time.

A `SpeechStream` is fed either by pushes (`push(samples)` of any size, then `end()`, possibly from
another thread: a TTS, a microphone, a socket) or by a pull source (an iterator of chunks, such as a
`SpeechFile` being decoded), which it reads only as far as a consumer asks. It keeps the samples from
`start` on and forgets the older ones when told (`release`), so memory stays flat however long the
speech is. Sample positions are absolute (counted from the first sample ever pushed).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from liveavatar.errors import UserError


class SpeechStream:
    def __init__(self, source: Iterable[np.ndarray] | None = None, total: int | None = None):
        """`source`: chunks to pull from as needed (the stream ends with it); None for a pushed stream.
        `total`: the length when it is known in advance (checked when the stream ends)."""
        self._source = iter(source) if source is not None else None
        self._buf = np.zeros(1024, np.float32)  # samples [start, arrived) live in _buf[_off:_off + n]
        self._off = 0
        self.start = 0
        self.arrived = 0
        self.eos = False
        self.expected = total
        self._cond = threading.Condition()

    # -- feeding -----------------------------------------------------------------------------------

    def push(self, samples) -> None:
        """Append 16 kHz mono samples (any length, float in [-1, 1] nominal)."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1) if np.ndim(samples) <= 1 else None
        if x is None:
            raise UserError(f"speech samples must be mono (1-D), got an array of shape {np.shape(samples)}; "
                            "downmix to one channel")
        if not np.all(np.isfinite(x)):
            raise UserError("speech samples contain NaN or infinite values; send finite PCM samples")
        with self._cond:
            if self.eos:
                raise UserError("speech was pushed after the stream was ended; start a new session")
            self._append(x)
            self._cond.notify_all()

    def end(self) -> None:
        """No more samples will come."""
        with self._cond:
            self.eos = True
            self._cond.notify_all()

    def _append(self, x: np.ndarray) -> None:
        n = self.arrived - self.start
        if self._off + n + len(x) > len(self._buf):
            live = self._buf[self._off:self._off + n]
            if n + len(x) > len(self._buf) // 2:  # grow geometrically: pushes cost O(1) amortised
                self._buf = np.zeros(max(2 * len(self._buf), 2 * (n + len(x))), np.float32)
            self._buf[:n] = live.copy()
            self._off = 0
        self._buf[self._off + n:self._off + n + len(x)] = x
        self.arrived += len(x)

    # -- reading -----------------------------------------------------------------------------------

    @property
    def total(self) -> int | None:
        """The final length, once the stream has ended (or as announced by the source)."""
        return self.arrived if self.eos else self.expected

    def have(self, n: int) -> bool:
        """Whether samples [0, n) have arrived or the stream has ended (so reads up to n are final).
        A pull source is read as far as needed; a pushed stream is only looked at."""
        with self._cond:
            while self.arrived < n and not self.eos and self._source is not None:
                chunk = next(self._source, None)
                if chunk is None:
                    self.eos = True
                else:
                    self._append(np.asarray(chunk, dtype=np.float32).reshape(-1))
            if self.eos and self.expected is not None and self.arrived != self.expected:
                raise UserError(f"the speech ended after {self.arrived} samples instead of the {self.expected} "
                                "it announced; the file changed while it was read")
            return self.arrived >= n or self.eos

    def wait(self, timeout: float | None = None) -> None:
        """Block until something is pushed or the stream ends (or `timeout` seconds pass)."""
        with self._cond:
            arrived, eos = self.arrived, self.eos
            self._cond.wait_for(lambda: self.arrived != arrived or self.eos != eos, timeout)

    def read(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b), zeros past the end of the stream. Needs `a >= start` and `have(b)`."""
        if a < self.start:
            raise RuntimeError(f"speech samples before {self.start} were released (asked from {a})")
        out = np.zeros(max(0, b - a), np.float32)
        with self._cond:
            hi = min(b, self.arrived)
            if hi > a:
                out[:hi - a] = self._buf[self._off + a - self.start:self._off + hi - self.start]
        return out

    def release(self, before: int) -> None:
        """Forget the samples before `before` (nothing will read them again)."""
        with self._cond:
            before = min(max(before, self.start), self.arrived)
            self._off += before - self.start
            self.start = before

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        with self._cond:
            return {"start": self.start, "arrived": self.arrived, "eos": self.eos,
                    "samples": self._buf[self._off:self._off + self.arrived - self.start].copy()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. A pull source must already start at `state["arrived"]`."""
        with self._cond:
            samples = np.asarray(state["samples"], dtype=np.float32)
            self._buf = np.zeros(max(1024, 2 * len(samples)), np.float32)
            self._buf[:len(samples)] = samples
            self._off, self.start, self.arrived = 0, int(state["start"]), int(state["arrived"])
            self.eos = bool(state["eos"])
            self._cond.notify_all()


__all__ = ["SpeechStream"]
