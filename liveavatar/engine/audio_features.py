"""The audio feature stream of a session: wav2vec2 features per video frame, as the speech arrives.

Video frame k is conditioned on the 25 stacked wav2vec2 hidden states at 30 Hz frame
j = round(k · 30 / fps), interpolated from the 50 Hz wav2vec2 frames, zero past the end of the speech.
Two encodings produce them:

- **one-pass** (the official one): the whole utterance normalised and encoded in one wav2vec2 call,
  resampled 50 -> 30 Hz with `align_corners=True` over its whole length. It needs the whole speech
  before the first frame, and its cost grows with the square of the length (attention).
- **windowed**: the 50 Hz frames are computed in fixed windows of `window` seconds, each encoded with
  `left` seconds of audio before it and `right` seconds after it (normalised over that span), and
  resampled at the fixed rate 50/30 (frame j sits at 50 Hz position 5j/3). Windows lie on a fixed
  grid and are computed only once their whole span has arrived (or the speech has ended), so the
  features do not depend on how the speech was chunked; cost is linear in the length and memory is
  flat. A block can start as soon as its audio plus `right` seconds (and the rest of its window) is in.
  A window whose span passes the end of the speech reads to the end (so one window over a whole
  utterance sees exactly what one pass sees).

`auto` (the default) uses one-pass for speech up to `one_pass_max_seconds` and windowed beyond; for a
pushed stream whose length is not known yet, the first block waits until the speech either ends or
passes that length, so a file and the same samples pushed in any chunks always get the same features.
The measured difference between the two encodings is in docs/design.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from liveavatar.engine.speech import SpeechStream
from liveavatar.errors import UserError
from liveavatar.models.wav2vec2 import AudioEncoder, conv_frames, resample_features, resampled_len

AUTO, ONE_PASS, WINDOWED = "auto", "one-pass", "windowed"
MODES = (AUTO, ONE_PASS, WINDOWED)


@dataclass(frozen=True)
class AudioWindows:
    """Windowed encoding geometry, in seconds (rounded to whole 50 Hz wav2vec2 frames)."""

    window: float = 1.0  # features kept per window
    left: float = 5.0  # audio encoded before the window (context)
    right: float = 1.0  # audio encoded after the window (look-ahead: adds to the first-frame latency)

    def frames(self, rate: int) -> tuple[int, int, int]:
        w, left, right = (round(x * rate) for x in (self.window, self.left, self.right))
        if w < 1 or left < 0 or right < 0:
            raise UserError(f"audio windows {self.window}/{self.left}/{self.right} s: the window must be at least "
                            f"{1 / rate:g} s and the contexts not negative")
        return w, left, right


def feature_index(k: int, fps: int, rate: int) -> int:
    """30 Hz feature index of video frame k: round(k · rate / fps), exact, ties to even. Equal to the
    official sampler's float time points wherever k · rate / fps is not a tie, which covers every
    frame at 25 fps (the model's rate); at a tie the official float value lands on either side."""
    q, r = divmod(k * rate, fps)
    if 2 * r > fps or (2 * r == fps and q % 2):
        q += 1
    return q


class AudioFeatures:
    """Per-video-frame features of one speech stream. `ready(k)` says whether frames [0, k) can be
    computed now (reading a pull source as far as needed); `frames(k0, k1)` returns them."""

    def __init__(self, encoder: AudioEncoder, speech: SpeechStream, *, fps: int, dtype: torch.dtype,
                 mode: str = AUTO, windows: AudioWindows | None = None, one_pass_max_seconds: float = 60.0,
                 run: Callable | None = None):
        if mode not in MODES:
            raise UserError(f"audio encoding {mode!r} is not one of {', '.join(MODES)}")
        self.encoder, self.speech, self.fps, self.dtype = encoder, speech, fps, dtype
        self.rate, self.interp = encoder.feature_rate, encoder.interp_rate
        self.windows = windows or AudioWindows()
        self.win, self.left, self.right = self.windows.frames(self.rate)
        self.one_pass_max = round(one_pass_max_seconds * 16000)
        self.run = run or (lambda fn: fn(encoder))  # runs fn(encoder) where the encoder computes
        self.mode = mode if mode != AUTO else None  # None until the auto choice can be made
        self.feat30: torch.Tensor | None = None  # one-pass: [25, T30, H]
        self.cache: dict[int, torch.Tensor] = {}  # windowed: window index -> [25, n, H] 50 Hz frames
        self.next_window = 0  # first window not computed yet

    # -- geometry ----------------------------------------------------------------------------------

    def _samples_for(self, hi: int) -> int:
        """Samples needed to compute 50 Hz frames [.., hi)."""
        return self.encoder.hop * (hi - 1) + self.encoder.receptive_field if hi > 0 else 0

    def _t50(self) -> int:
        """50 Hz frames computable from what has arrived (final once the speech ended)."""
        return conv_frames(self.speech.arrived, self.encoder.model.config.conv_kernel,
                           self.encoder.model.config.conv_stride)

    def _span(self, w: int, t50_final: int | None) -> tuple[int, int, int]:
        """50 Hz frames [lo, hi) window w encodes, and the end of the samples it reads: up to frame
        hi's receptive field, or to the end of the speech when the speech ends inside its span."""
        lo, hi = max(0, w * self.win - self.left), (w + 1) * self.win + self.right
        if t50_final is not None and hi > t50_final:
            return lo, t50_final, self.speech.total
        return lo, hi, self._samples_for(hi)

    def _position(self, j: int) -> tuple[int, int]:
        """50 Hz frame below 30 Hz frame j, and the numerator of its fractional offset (over interp)."""
        return divmod(j * self.rate, self.interp)

    # -- readiness ---------------------------------------------------------------------------------

    def _decide(self) -> bool:
        """Resolve `auto` once the length is known or exceeds the one-pass limit."""
        if self.mode is None:
            total = self.speech.total
            if total is None and self.speech.have(self.one_pass_max + 1):
                total = self.speech.total if self.speech.eos else self.speech.arrived
            if total is not None:
                self.mode = ONE_PASS if total <= self.one_pass_max else WINDOWED
        return self.mode is not None

    def ready(self, k1: int) -> bool:
        """Whether the features of video frames [0, k1) can be computed now."""
        if k1 <= 0:
            return True
        if not self._decide():
            return False
        if self.mode == ONE_PASS:
            return self.feat30 is not None or self.speech.have(float("inf"))
        j = feature_index(k1 - 1, self.fps, self.interp)
        p0, frac = self._position(j)
        w = (p0 + (frac > 0)) // self.win
        if not self.speech.have(self._samples_for((w + 1) * self.win + self.right)):
            return False
        t50 = self._t50()
        return self.speech.eos or resampled_len(t50, self.rate, self.interp) > j

    # -- features ----------------------------------------------------------------------------------

    def frames(self, k0: int, k1: int) -> torch.Tensor:
        """Features of video frames [k0, k1): [1, 25, H, k1 - k0] in host memory. Needs `ready(k1)`."""
        if not self.ready(k1):
            raise RuntimeError(f"audio features for frames up to {k1} are not ready")
        if self.mode == ONE_PASS:
            return self._one_pass_frames(k0, k1)
        return self._windowed_frames(k0, k1)

    def _one_pass_frames(self, k0: int, k1: int) -> torch.Tensor:
        if self.feat30 is None:
            wave = self.speech.read(0, self.speech.total)
            hidden = self.run(lambda m: m.encode(m.normalize(wave)))  # [25, T50, H]
            self.feat30 = resample_features(hidden, self.rate, self.interp).to("cpu")
        layers, t30, hidden = self.feat30.shape
        out = self.feat30.new_zeros(layers, k1 - k0, hidden)
        for i, k in enumerate(range(k0, k1)):
            j = feature_index(k, self.fps, self.interp)
            if j < t30:
                out[:, i] = self.feat30[:, j]
        return out.permute(0, 2, 1).unsqueeze(0).to(self.dtype)

    def _windowed_frames(self, k0: int, k1: int) -> torch.Tensor:
        t50_final = self._t50() if self.speech.eos else None
        t30_final = resampled_len(t50_final, self.rate, self.interp) if t50_final is not None else None
        cols = []
        for k in range(k0, k1):
            j = feature_index(k, self.fps, self.interp)
            if t30_final is not None and j >= t30_final:
                cols.append(None)
                continue
            p0, frac = self._position(j)
            x = self._frame50(p0, t50_final).float()
            if frac:  # linear between frames p0 and p0 + 1, in float32
                x = x + (self._frame50(p0 + 1, t50_final).float() - x) * (frac / self.interp)
            cols.append(x)
        shape = next((c.shape for c in cols if c is not None), None)
        if shape is None:
            shape = (self.encoder.num_states, self.encoder.model.config.hidden_size)
        out = torch.stack([c if c is not None else torch.zeros(shape) for c in cols], dim=1)  # [25, n, H]
        # Windows before the one holding the next frame's features are not needed again.
        p_next, _ = self._position(feature_index(k1, self.fps, self.interp))
        for w in [w for w in self.cache if w < p_next // self.win]:
            del self.cache[w]
        return out.permute(0, 2, 1).unsqueeze(0).to(self.dtype)

    def _frame50(self, p: int, t50_final: int | None) -> torch.Tensor:
        """50 Hz frame p: [25, H], computing its window (and any computable ones before it) if needed."""
        w = p // self.win
        if w not in self.cache:
            self._compute_windows(w, t50_final)
        return self.cache[w][:, p - w * self.win]

    def _compute_windows(self, last: int, t50_final: int | None) -> None:
        """Compute windows [next_window, last] in one encoder call (a single move of an offloaded encoder)."""
        todo = list(range(max(self.next_window, 0), last + 1))
        spans = [self._span(w, t50_final) for w in todo]
        pieces = [self.speech.read(self.encoder.hop * lo, end) for lo, _, end in spans]

        def encode_all(m):
            return [m.encode(m.normalize(x)) for x in pieces]

        for w, (lo, hi, _), hidden in zip(todo, spans, self.run(encode_all), strict=True):
            if hidden.shape[1] != hi - lo:
                raise RuntimeError(f"window {w}: expected {hi - lo} wav2vec2 frames, got {hidden.shape[1]}")
            keep_hi = (w + 1) * self.win if t50_final is None else min((w + 1) * self.win, t50_final)
            self.cache[w] = hidden[:, w * self.win - lo:keep_hi - lo].to("cpu")
        self.next_window = last + 1

    def keep_from(self) -> int:
        """The earliest speech sample that future features still need."""
        if self.mode == WINDOWED:
            return self.encoder.hop * max(0, self.next_window * self.win - self.left)
        if self.mode == ONE_PASS and self.feat30 is not None:
            return self.speech.arrived
        return 0  # undecided or one-pass pending: the whole speech is needed

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"mode": self.mode, "feat30": self.feat30, "cache": dict(self.cache), "next_window": self.next_window}

    def load_state_dict(self, state: dict) -> None:
        self.mode, self.feat30 = state["mode"], state["feat30"]
        self.cache, self.next_window = dict(state["cache"]), int(state["next_window"])


__all__ = ["AUTO", "AudioFeatures", "AudioWindows", "MODES", "ONE_PASS", "WINDOWED", "feature_index"]
