"""A streaming session: the stages of one generation composed by the single-process scheduler.

A session is made from a reference image, a prompt, options and speech (a file, samples, or pushed
over time). It owns its stages (`liveavatar.engine`): the conditioning (text context, reference and
motion latents, the audio feature stream), one or more denoise stages (consecutive denoising steps,
each with its ring caches and its own sink), and the decode stage (VAE and its stream state). For
every block it asks the task plan for the block's task, sends the sink-refresh event to every denoise
stage when it is due, runs the stages one after another and turns the decoded frames into a `Chunk`
(12 frames, 9 for the first block, with the 16 kHz audio that plays with them). Iterating yields the
chunks; everything else (the CLI, files, servers) consumes that generator.

Semantics follow the official streaming pipeline (4-step Euler with timestep forcing, fresh noise per
clip, the rolling sink, the sink refresh at clip 1, online VAE decode warmed up on 7 motion latents,
the first 3 frames dropped); the deliberate differences are listed in docs/design.md.

A session's whole state (next block, stage caches, decoder state, speech position, conditioning) is
explicit: `save(path)` writes it, `Session.restore` continues it in another process with identical
output. `close()` (or leaving a `with` block) frees every cache at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from liveavatar.engine.audio_features import MODES, AudioWindows
from liveavatar.engine.conditioning import Conditioning, audio_features, encode_conditioning
from liveavatar.engine.decode import DecodeStage
from liveavatar.engine.denoise import DenoiseStage
from liveavatar.engine.frontend import Frontend
from liveavatar.engine.sampler import make_schedule
from liveavatar.engine.speech import SpeechStream
from liveavatar.engine.task import DROP_FIRST_FRAMES, BlockTask, StreamLength, TaskPlan
from liveavatar.errors import UserError
from liveavatar.io import media
from liveavatar.models.layout import SinkLayout

MAX_SAMPLE_STEPS = 50  # each step holds a ring KV cache (10 GB a step at full size, 704x384)
MIN_SPEECH_SECONDS = 0.48  # one block of 12 video frames
STATE_FORMAT = "liveavatar-session"
STATE_VERSION = 1


@dataclass(frozen=True)
class GenerationOptions:
    size: int = 704 * 384  # area cap in pixels; the output keeps the image aspect, sides multiple of 64
    infer_frames: int = 48  # video frames per clip (multiple of 12)
    num_clip: int | None = None  # at most this many clips (None: as many as the audio needs, trimmed to it)
    seed: int = 42
    sample_steps: int = 4
    online_decode: bool = True  # decode each block as soon as it is denoised
    sink_refresh: bool = True  # re-prefill the sink at clip 1 with the first generated latent
    # Video frames into the speech where the muxed audio starts: DROP_FIRST_FRAMES keeps each frame
    # with the audio it was generated from; 0 reproduces the official muxing (video 0.12 s early).
    audio_offset_frames: int = DROP_FIRST_FRAMES
    # Denoising steps per denoise stage, in order (e.g. (2, 2)); None: one stage with every step.
    denoise_stages: tuple[int, ...] | None = None
    audio_encoding: str = "auto"  # "auto", "one-pass" (official) or "windowed" (see audio_features.py)
    audio_window: tuple[float, float, float] = (1.0, 5.0, 1.0)  # windowed encoding: window, left, right (s)
    one_pass_max_seconds: float = 60.0  # "auto": one-pass up to this speech length, windowed beyond


def check_options(opts: GenerationOptions) -> None:
    if opts.infer_frames <= 0 or opts.infer_frames % 12:
        raise UserError(f"--infer_frames {opts.infer_frames} is not a positive multiple of 12; use 48")
    if opts.num_clip is not None and opts.num_clip <= 0:
        raise UserError(f"--num_clip {opts.num_clip} must be at least 1 (or omit it to follow the audio)")
    if not 0 <= opts.audio_offset_frames <= DROP_FIRST_FRAMES:
        raise UserError(f"--audio_offset_frames {opts.audio_offset_frames} must be between 0 and {DROP_FIRST_FRAMES}")
    if not 1 <= opts.sample_steps <= MAX_SAMPLE_STEPS:
        raise UserError(f"--sample_steps {opts.sample_steps} must be between 1 and {MAX_SAMPLE_STEPS}; "
                        "the distilled model uses 4")
    if not 0 <= opts.seed < 2**63:
        raise UserError(f"seed {opts.seed} must be between 0 and 2^63 - 1")
    if opts.denoise_stages is not None and (sum(opts.denoise_stages) != opts.sample_steps
                                            or min(opts.denoise_stages, default=0) < 1):
        raise UserError(f"denoise stages {tuple(opts.denoise_stages)} must split the {opts.sample_steps} "
                        "denoising steps into parts of at least one step each")
    if opts.audio_encoding not in MODES:
        raise UserError(f"--audio_encoding {opts.audio_encoding} is not one of {', '.join(MODES)}")
    if not opts.one_pass_max_seconds >= 0:
        raise UserError(f"one_pass_max_seconds {opts.one_pass_max_seconds} must be a non-negative number")
    AudioWindows(*opts.audio_window).frames(50)


@dataclass
class Chunk:
    index: int  # block index
    frame_start: int  # index of the first frame in the output video
    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # float32 mono samples at 16 kHz that play with these frames


@dataclass
class Inputs:
    """Validated user inputs, prepared before any model is loaded."""

    ref: torch.Tensor  # [3, H, W] float32 in [-1, 1]
    height: int
    width: int
    speech: media.SpeechFile | np.ndarray | None  # a checked file, 16 kHz samples, or None: pushed later

    @classmethod
    def load(cls, image: str, audio: str | os.PathLike | np.ndarray | None, opts: GenerationOptions) -> Inputs:
        check_options(opts)
        ref, (h, w) = media.load_reference_image(image, opts.size)
        if audio is None:
            return cls(ref, h, w, None)
        if isinstance(audio, np.ndarray):
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1 or not np.all(np.isfinite(audio)):
                raise UserError("speech samples must be a 1-D array of finite 16 kHz mono samples")
            seconds, where = len(audio) / media.SAMPLE_RATE, "the speech samples"
        else:
            audio = media.open_speech(audio)  # decoded once, block by block: checked, not kept
            seconds, where = audio.seconds, f"audio file {str(audio.path)!r}"
        if seconds < MIN_SPEECH_SECONDS:
            raise UserError(f"{where} lasts {seconds:.2f} s, shorter than one block of video "
                            f"({MIN_SPEECH_SECONDS} s); use at least {MIN_SPEECH_SECONDS} s of speech")
        return cls(ref, h, w, audio)

    @property
    def silent(self) -> bool:
        if isinstance(self.speech, media.SpeechFile):
            return self.speech.silent
        return self.speech is not None and media.audio_is_silent(self.speech)

    def warnings(self) -> list[str]:
        """What is accepted but worth saying (one line each)."""
        if self.silent:
            is_file = isinstance(self.speech, media.SpeechFile)
            where = f"the audio {str(self.speech.path)!r}" if is_file else "the speech"
            return [f"{where} is silent; the avatar will barely move"]
        return []


def speech_stream(audio: media.SpeechFile | np.ndarray | None, start: int = 0) -> SpeechStream:
    """The stream a session reads its speech from, from 16 kHz sample `start` on: a file is decoded
    as far as the session needs it, samples are there at once, None waits for pushes."""
    if isinstance(audio, media.SpeechFile):
        return SpeechStream(audio.chunks(start), total=audio.num_samples)
    stream = SpeechStream()
    if audio is not None:
        stream.push(np.asarray(audio)[start:])
        stream.end()
    return stream


class Session:
    """State of one generation; iterate it (or `poll()` it) to get `Chunk`s."""

    def __init__(self, pipe, height: int, width: int, opts: GenerationOptions, speech: SpeechStream | None,
                 live: bool = False):
        """Stages and caches of a generation, not yet conditioned: use `Pipeline.session` (or
        `Session.restore`, `Pipeline.live_session`). `live`: speech comes as utterances and the session
        never ends (`liveavatar.engine.live`)."""
        check_options(opts)
        self.pipe, self.opts, self.height, self.width = pipe, opts, height, width
        self.schedule = make_schedule(pipe.preset.sampler, opts.sample_steps)
        self.layout = SinkLayout(height // 8, width // 8, pipe.preset.dit.zip_frame_buckets)
        self.live = live
        self.frontend = make_live_frontend(pipe, opts, self.layout) if live else make_frontend(pipe, opts, self.layout,
                                                                                              speech)
        parts = opts.denoise_stages or (len(self.schedule),)
        firsts = np.cumsum((0, *parts[:-1])).tolist()
        self.denoise = [DenoiseStage(pipe.dit, self.schedule, range(a, a + k), self.layout, pipe.device, pipe.dtype,
                                     pipe.runtime) for a, k in zip(firsts, parts, strict=True)]
        self.decode = DecodeStage(pipe.vae, pipe.device)
        self.cond: Conditioning | None = None
        self.first_latent: torch.Tensor | None = None  # block 0's first clean latent (the sink refresh)
        self.decode_started = False
        self._pending: list[tuple[BlockTask, torch.Tensor]] = []  # offline decode: denoised, not decoded
        self.closed = False

    @classmethod
    def create(cls, pipe, inputs: Inputs, prompt: str, opts: GenerationOptions, live: bool = False) -> Session:
        """Encode the conditioning, prefill every denoise stage's sink: a session at block 0."""
        session = cls(pipe, inputs.height, inputs.width, opts, None if live else speech_stream(inputs.speech), live)
        session.cond = encode_conditioning(pipe, inputs.ref, prompt)
        for stage in session.denoise:
            stage.start(session.cond.text, session.cond.ref_latent, session.cond.motion_latents)
        return session

    # -- speech and length ---------------------------------------------------------------------------

    @property
    def speech(self) -> SpeechStream:
        return self.frontend.speech

    @property
    def features(self):
        return self.frontend.features

    def push_audio(self, samples) -> None:
        """Append 16 kHz mono speech samples (any length) to a session made without audio (live: to the
        open utterance)."""
        self.frontend.push(samples)

    def end_audio(self) -> None:
        """The speech is complete: the video ends with it (live: the utterance is complete)."""
        self.frontend.end()

    def barge_in(self) -> int:
        """Live sessions: drop the speech playing and queued at once; returns the utterances dropped."""
        if not self.live:
            raise UserError("barge-in is for live sessions; a file's video ends with its speech")
        return self.frontend.barge_in()

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the user should know about this session's inputs (a truncated prompt, ...)."""
        return self.cond.warnings if self.cond is not None else ()

    @property
    def audio_position(self) -> int:
        """16 kHz samples of speech received so far (a restored pushed session continues from here)."""
        return self.speech.arrived

    @property
    def next_block(self) -> int:
        return self.frontend.next_block

    @property
    def length(self) -> StreamLength | None:
        """Clips, blocks and frames of the whole video, once the speech length is known."""
        return self.frontend.length

    @property
    def num_frames(self) -> int | None:
        return None if self.length is None else self.length.num_frames

    @property
    def num_blocks(self) -> int | None:
        return None if self.length is None else self.length.num_blocks

    @property
    def num_clips(self) -> int | None:
        return None if self.length is None else self.length.num_clips

    @property
    def done(self) -> bool:
        return self.frontend.done and not self._pending

    # -- the scheduler -----------------------------------------------------------------------------

    def _wait_ready(self, wait: bool) -> bool | None:
        """Wait (if `wait`) until the next block can run: True to run it, False when the video is over,
        None when more speech is needed and `wait` is off."""
        while (ready := self.frontend.ready()) is None and wait:
            self.frontend.wait()
        return ready

    def _denoise_next(self) -> tuple[BlockTask, torch.Tensor]:
        """Run every denoise stage on the next block: (its task, its clean latents [1, C, F, h, w])."""
        task = self.frontend.take()
        if task.refresh_sink:
            for stage in self.denoise:
                stage.refresh(self.first_latent)
        z = None
        for stage in self.denoise:
            z = stage(task, z)
        if task.index == 0:
            self.first_latent = z[:, :, :1].clone()
        return task, z

    def _decode(self, task: BlockTask, z: torch.Tensor) -> Chunk | None:
        """Decode a block into its chunk (None when it adds no frame to the video)."""
        if not self.decode_started:
            self.decode.start(self.cond.motion_latents)
            self.decode_started = True
        return output_chunk(task, self.decode(z))

    def _chunks(self, wait: bool) -> Iterator[Chunk]:
        self._check_open()
        if not self.opts.online_decode:  # every latent first, then the decode (same frames)
            while (ready := self._wait_ready(wait)) is True:
                self._pending.append(self._denoise_next())
            if ready is None:
                return
            while self._pending:
                chunk = self._decode(*self._pending.pop(0))
                if chunk is not None:
                    yield chunk
            return
        while self._wait_ready(wait):
            chunk = self._decode(*self._denoise_next())
            if chunk is not None:
                yield chunk

    def __iter__(self) -> Iterator[Chunk]:
        """Every remaining chunk. A pushed session blocks until its speech arrives (push from another
        thread) and ends when `end_audio()` was called and the video is complete."""
        return self._chunks(wait=True)

    def poll(self) -> Iterator[Chunk]:
        """The chunks that the speech received so far allows, without waiting for more."""
        return self._chunks(wait=False)

    def step(self) -> Chunk | None:
        """One block, if the next one can start now: its chunk (None when it cannot start yet, or adds
        no frame). For schedulers that interleave sessions (a server); online decode only."""
        self._check_open()
        if self._wait_ready(wait=False) is not True:
            return None
        return self._decode(*self._denoise_next())

    def latents(self, wait: bool = True) -> Iterator[torch.Tensor]:
        """Clean latents block by block, [1, C, F, h, w], without decoding (benchmarks and tests; the
        session cannot decode afterwards). With `wait` off, stops where more speech is needed."""
        self._check_open()
        while self._wait_ready(wait):
            yield self._denoise_next()[1]

    # -- state -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the session is closed")

    def state_dict(self) -> dict:
        """Everything needed to continue this session elsewhere: tensors and plain values only."""
        self._check_open()
        if self._pending:
            raise UserError("a session decoding offline cannot be saved mid-way; use online decode")
        frontend = self.frontend.state_dict()
        frontend["speech"]["samples"] = torch.from_numpy(frontend["speech"]["samples"])
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "preset": self.pipe.preset.name,
            "dtype": str(self.pipe.dtype).removeprefix("torch."), "height": self.height, "width": self.width,
            "options": asdict(self.opts), "frontend": frontend, "first_latent": self.first_latent,
            "decode_started": self.decode_started, "conditioning": self.cond.tensors(),
            "denoise": [stage.state_dict() for stage in self.denoise], "decode": self.decode.state_dict(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to `path` atomically (a temporary file in the same folder, then a rename)."""
        path = Path(path)
        state = self.state_dict()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def restore(cls, pipe, state: dict | str | os.PathLike,
                audio: str | os.PathLike | media.SpeechFile | np.ndarray | None = None) -> Session:
        """Continue a saved session with the same pipeline (preset and dtype). `audio` is the session's
        speech again: a file (read on from where the session was), all samples, or None to push the
        rest (from `audio_position` on)."""
        if not isinstance(state, dict):
            try:
                state = torch.load(state, map_location="cpu", weights_only=True)
            except Exception as exc:  # unreadable, truncated, not a torch file, or holding other objects
                reason = " ".join(str(exc).split())[:200]
                raise UserError(f"cannot read the session state {str(state)!r} ({type(exc).__name__}: {reason}); "
                                "it must be a file written by Session.save") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise UserError("the file is not a session state of this version of liveavatar; start the session anew")
        dtype = str(pipe.dtype).removeprefix("torch.")
        if (state["preset"], state["dtype"]) != (pipe.preset.name, dtype):
            raise UserError(f"the session state was made with preset {state['preset']} in {state['dtype']}, this "
                            f"pipeline is {pipe.preset.name} in {dtype}; load the same model")
        names = {f.name for f in fields(GenerationOptions)}
        opts = GenerationOptions(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in state["options"].items() if k in names})
        if isinstance(audio, (str, os.PathLike)):
            audio = media.open_speech(audio)
        frontend = state["frontend"]
        arrived = int(frontend["speech"]["arrived"])
        stream = speech_stream(audio if isinstance(audio, media.SpeechFile) else None, start=arrived)
        session = cls(pipe, int(state["height"]), int(state["width"]), opts, stream)
        session.frontend.load_state_dict(dict(frontend, speech=dict(frontend["speech"],
                                                                   samples=frontend["speech"]["samples"].numpy())))
        if isinstance(audio, np.ndarray) and not stream.eos:
            stream.push(audio[arrived:])
            stream.end()
        cond = state["conditioning"]
        session.cond = Conditioning(*(cond[k].to(pipe.device) for k in ("text", "ref_latent", "motion_latents")))
        session.first_latent = state["first_latent"]
        if session.first_latent is not None:
            session.first_latent = session.first_latent.to(pipe.device)
        session.decode_started = bool(state["decode_started"])
        if len(state["denoise"]) != len(session.denoise):
            raise UserError("the session state has another split of denoise stages than its options")
        for stage, st in zip(session.denoise, state["denoise"], strict=True):
            stage.load_state_dict(st, session.cond.text, session.cond.motion_latents)
        session.decode.load_state_dict(state["decode"])
        return session

    def close(self) -> None:
        """Free every cache now; pending copies on side streams are waited for first."""
        if self.closed:
            return
        for stage in self.denoise:
            stage.close()
        self.decode.close()
        self.cond, self.first_latent, self._pending = None, None, []
        self.closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_frontend(pipe, opts: GenerationOptions, layout: SinkLayout, speech: SpeechStream) -> Frontend:
    """The frontend of a session of `pipe` with these options over `speech`."""
    cfg = pipe.preset.dit
    blocks_per_clip = opts.infer_frames // (4 * cfg.frames_per_block)
    plan = TaskPlan(opts.seed, opts.sample_steps, (cfg.in_dim, layout.h, layout.w), pipe.dtype, cfg.frames_per_block,
                    blocks_per_clip, cfg.rsfm_d_range, opts.sink_refresh)
    features = audio_features(pipe, speech, opts.audio_encoding, AudioWindows(*opts.audio_window),
                              opts.one_pass_max_seconds)
    return Frontend(speech, features, plan, infer_frames=opts.infer_frames, num_clip=opts.num_clip,
                    audio_offset_frames=opts.audio_offset_frames, fps=pipe.preset.fps, sample_rate=media.SAMPLE_RATE)


def make_live_frontend(pipe, opts: GenerationOptions, layout: SinkLayout):
    """The frontend of a live session of `pipe` with these options."""
    from liveavatar.engine.live import LiveFrontend

    cfg = pipe.preset.dit
    blocks_per_clip = opts.infer_frames // (4 * cfg.frames_per_block)
    plan = TaskPlan(opts.seed, opts.sample_steps, (cfg.in_dim, layout.h, layout.w), pipe.dtype, cfg.frames_per_block,
                    blocks_per_clip, cfg.rsfm_d_range, opts.sink_refresh)
    windows = AudioWindows(*opts.audio_window)
    return LiveFrontend(lambda speech: audio_features(pipe, speech, opts.audio_encoding, windows,
                                                      opts.one_pass_max_seconds),
                        plan, fps=pipe.preset.fps, sample_rate=media.SAMPLE_RATE, audio_layers=cfg.audio_layers,
                        audio_dim=cfg.audio_dim, dtype=pipe.dtype)


def output_chunk(task: BlockTask, frames: np.ndarray) -> Chunk | None:
    """The chunk of a block from its decoded frames: the kept ones and the speech that plays with them."""
    lo, hi = task.keep
    if hi <= lo:
        return None
    return Chunk(task.index, task.video_start, frames[lo:hi], task.speech)


__all__ = ["Chunk", "GenerationOptions", "Inputs", "Session", "check_options", "make_frontend", "output_chunk",
           "speech_stream"]
