"""Resumable renders: what a job is, its saved state beside the partial video, and when to save it.

A render that dies (killed, preempted, out of memory) leaves its partial MP4 (`<stem>.partial.mp4`)
and, beside it, the state of its last checkpoint (`<stem>.partial.state`): the session's whole state
(`Session.state_dict`: step caches, sink, decoder state, speech position, conditioning), where the
MP4 writer stood (bytes, hash, frames, the audio its encoder needs again) and the job's identity.

The identity (`JobIdentity`) is everything that decides the video: the generation options (seed
included), the prompt, the content hashes of the image and the speech, and the model (preset, dtype,
a fingerprint of the weight files, the numerics-changing runtime flags, the device type). A resume
is refused, naming what changed, unless every part is equal; the same identity's hash is written into
the finished MP4 (its `comment` tag), so a finished job is recognised by its file.

State files are written atomically (a temporary file, fsync, rename, fsync of the folder): a kill at
any moment leaves the previous state or the new one, never a torn one. `Checkpointer` decides when:
every N blocks, or by default whenever the time spent saving stays within a budget of the run time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from liveavatar.errors import UserError

STATE_FORMAT = "liveavatar-render-state"
STATE_VERSION = 1
STATE_SUFFIX = ".state"
COMMENT_PREFIX = "liveavatar-job "  # the MP4 comment tag: prefix + identity hash
OVERHEAD_BUDGET = 0.02  # auto interval: time spent saving state <= 2 % of the generation time (limit: 3 %)
ASSUMED_WRITE_BYTES_PER_S = 1e9  # first auto checkpoint, before one was measured
_SAMPLE = 1 << 16  # bytes per sampled window of a weight file
_SAMPLES = 16

# Option fields and how the user sets them (for messages).
OPTION_FLAGS = {
    "size": "--size", "infer_frames": "--infer_frames", "num_clip": "--num_clip", "seed": "--base_seed",
    "sample_steps": "--sample_steps", "online_decode": "--offline_decode", "sink_refresh": "sink_refresh",
    "audio_offset_frames": "--audio_offset_frames", "denoise_stages": "denoise_stages",
    "audio_encoding": "--audio_encoding", "audio_window": "--audio_window",
    "one_pass_max_seconds": "one_pass_max_seconds",
}


def file_sha256(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
    return sha.hexdigest()


def weights_fingerprint(paths: list[str | os.PathLike]) -> str:
    """A content fingerprint of weight files and folders without reading them whole (a full hash of
    the 50 GB of the real model takes minutes): per file its relative name, size, and sha256 of 16
    evenly spaced 64 KiB windows plus the first and last one (safetensors and .pth headers, and
    samples of every tensor region). Any retrained, merged or replaced file changes it."""
    sha = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                     if p.is_file() and not any(part.startswith(".") for part in
                                                                                p.relative_to(root).parts))
        for p in files:
            size = p.stat().st_size
            sha.update(f"{p.relative_to(root) if p != root else p.name}\0{size}\0".encode())
            with open(p, "rb") as f:
                for i in range(_SAMPLES + 1):
                    f.seek(min(size, i * max(0, size - _SAMPLE) // _SAMPLES))
                    sha.update(f.read(_SAMPLE))
    return sha.hexdigest()


@dataclass
class JobIdentity:
    """What decides a render's video; equal identities give the same frames and audio."""

    options: dict  # GenerationOptions as a dict; seed None: any (a resume with a random seed takes the saved one)
    prompt: str
    image: list  # [path, sha256]
    audio: list  # [path, sha256]
    model: dict = field(default_factory=dict)  # preset, dtype, weights, fp8, kv_fp8, device

    @classmethod
    def make(cls, opts, prompt: str, image: str, audio: str, model: dict, any_seed: bool = False) -> JobIdentity:
        options = json.loads(json.dumps(asdict(opts)))  # tuples -> lists: compares equal after a JSON round trip
        if any_seed:
            options["seed"] = None
        return cls(options, prompt, [str(image), file_sha256(image)], [str(audio), file_sha256(audio)], model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobIdentity:
        return cls(dict(d["options"]), d["prompt"], list(d["image"]), list(d["audio"]), dict(d["model"]))

    def fingerprint(self) -> str:
        """Hash of everything but file names (the same content under another name is the same job)."""
        d = {"options": self.options, "prompt": self.prompt, "image": self.image[1], "audio": self.audio[1],
             "model": self.model}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def difference(self, saved: JobIdentity) -> str | None:
        """What differs from `saved` (the state's), as a clause for a message; None if nothing does."""
        if self.image[1] != saved.image[1]:
            return (f"the image {self.image[0]!r} is not the one the saved render was made from ({saved.image[0]!r}, "
                    "different content)")
        if self.audio[1] != saved.audio[1]:
            return (f"the audio {self.audio[0]!r} is not the one the saved render was made from ({saved.audio[0]!r}, "
                    "different content)")
        for key, flag in OPTION_FLAGS.items():
            mine, theirs = self.options.get(key), saved.options.get(key)
            if key == "seed" and mine is None:
                continue
            if mine != theirs:
                return f"{flag} is {_show(key, mine)} but the saved render used {_show(key, theirs)}"
        if self.prompt != saved.prompt:
            return "the --prompt differs from the saved render's"
        for key in sorted(set(self.model) | set(saved.model)):
            if self.model.get(key) != saved.model.get(key):
                what = "the model weights differ from" if key == "weights" else \
                    f"the model's {key} is {self.model.get(key)} but it was {saved.model.get(key)} in"
                return f"{what} the saved render's"
        return None

    def matches(self, saved: JobIdentity) -> bool:
        return self.difference(saved) is None


def _show(key: str, value) -> str:
    if key == "online_decode":
        return "off" if value else "on"
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def state_path(partial: str | os.PathLike) -> Path:
    """The state file beside a partial video: `<stem>.partial.mp4` -> `<stem>.partial.state`."""
    return Path(partial).with_suffix(STATE_SUFFIX)


def states_beside(save_file: str | os.PathLike) -> list[Path]:
    """The state files of an output's partial videos (`<stem>.partial*.state`), oldest first."""
    import glob

    save_file = Path(save_file)
    pattern = glob.escape(str(save_file.parent / f"{save_file.stem}.partial")) + "*" + STATE_SUFFIX
    return sorted((Path(p) for p in glob.glob(pattern)), key=lambda p: p.stat().st_mtime_ns)


def remove_state(path: str | os.PathLike) -> None:
    """Remove a state file and any temporary file a killed write left beside it."""
    import glob

    path = Path(path)
    path.unlink(missing_ok=True)
    for tmp in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
        Path(tmp).unlink(missing_ok=True)


@dataclass
class SavedState:
    """A state file read lazily: the header at once, the tensors (memory-mapped) when restored."""

    path: Path
    job: JobIdentity
    writer: dict
    session: dict
    block: int  # the next block to generate

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.writer["partial"])


def read_state(path: str | os.PathLike) -> SavedState:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, foreign or from another torch: one line, never a traceback
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"the saved state {str(path)!r} cannot be read ({type(exc).__name__}: {reason}); "
                        "remove it and run without --resume to start anew") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise UserError(f"{str(path)!r} is not a render state of this version of liveavatar; remove it and run "
                        "without --resume to start anew")
    return SavedState(path, JobIdentity.from_dict(state["job"]), state["writer"], state["session"],
                      int(state["session"]["frontend"]["next_block"]))


def write_state(path: str | os.PathLike, job: JobIdentity, writer: dict, session: dict) -> int:
    """Write a state file atomically; returns its size in bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "job": job.to_dict(), "writer": _tensors(writer),
             "session": session}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # Ctrl-C, SIGTERM or a failed write inside torch.save surfaces as the zip writer's RuntimeError:
        # raise the cause (stop as asked; a full disk is an OSError).
        chain, e = [], exc
        while e is not None and len(chain) < 16:
            chain.append(e)
            e = e.__context__
        cause = next((e for e in chain if not isinstance(e, Exception)), None) or \
            next((e for e in chain if isinstance(e, OSError)), exc)
        raise cause from None
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable
    finally:
        os.close(fd)
    return path.stat().st_size


def _tensors(writer: dict) -> dict:
    """The writer checkpoint with its sample array as a tensor (state files hold tensors and plain values)."""
    import numpy as np

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in writer.items()}


def state_nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


class Checkpointer:
    """When to save a render's state, and what it cost.

    `every`: save after every N-th block; 0: never; None (auto, the default): after a block whenever
    the seconds spent saving, this save included (estimated from the last one, or from its bytes at
    1 GB/s before the first), stay within `OVERHEAD_BUDGET` of the seconds spent generating so far.
    The budget holds at any size and on any disk: big states are saved less often."""

    def __init__(self, every: int | None = None, budget: float = OVERHEAD_BUDGET):
        self.every, self.budget = every, budget
        self.count, self.seconds, self.bytes = 0, 0.0, 0
        self.last_seconds: float | None = None
        self.t0 = time.perf_counter()

    def due(self, blocks: int, state_bytes) -> bool:
        """Whether to save after `blocks` blocks made by this process; `state_bytes()` gives the size."""
        if self.every is not None:
            return self.every > 0 and blocks % self.every == 0
        cost = self.last_seconds
        if cost is None:
            cost = state_bytes() / ASSUMED_WRITE_BYTES_PER_S
        return self.seconds + cost <= self.budget * (time.perf_counter() - self.t0)

    def save(self, path, job: JobIdentity, writer: dict, session: dict) -> str | None:
        """Write the state; a write that fails (a full disk, a removed folder) stops checkpointing and
        returns why in one line (the previous state stays valid; the render itself may go on)."""
        t = time.perf_counter()
        try:
            self.bytes = write_state(path, job, writer, session)
        except OSError as e:
            from liveavatar.io.output import is_disk_full

            self.every = 0
            why = "the disk is full" if is_disk_full(e) else (e.strerror or str(e))
            return f"could not save the checkpoint {str(path)!r} ({why}); the render goes on without checkpoints"
        self.last_seconds = time.perf_counter() - t
        self.seconds += self.last_seconds
        self.count += 1
        return None

    def summary(self) -> str:
        if not self.count:
            return "no checkpoint saved"
        run = time.perf_counter() - self.t0
        return (f"{self.count} checkpoint(s) of {self.bytes / 2**20:.1f} MiB, {self.seconds / self.count:.2f} s each "
                f"({100 * self.seconds / max(run, 1e-9):.1f} % of the generation time)")


__all__ = ["COMMENT_PREFIX", "Checkpointer", "JobIdentity", "SavedState", "file_sha256", "read_state",
           "remove_state", "state_nbytes", "state_path", "states_beside", "weights_fingerprint", "write_state"]
