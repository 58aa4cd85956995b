"""One video rendered to an MP4 file, able to survive being killed: the unit of `generate` and `batch`.

A `Job` is a checked request (inputs loaded, options validated, identity hashed) for one output
file. `locate` decides, before any weight is loaded, how it starts: from the beginning, from the
state a killed run saved beside its partial video (refused, naming what changed, when the job is not
the same), or not at all because the finished file is already there (its MP4 comment carries the
job's identity hash). `Render` then streams the session into the MP4 writer, saves the state every
so often (`Checkpointer`), and on success publishes the video and removes the state.

Resuming reopens the partial video, checks the hash of its first bytes against the state, cuts it at
the checkpointed fragment and continues the session from the checkpointed block: the frames and
audio samples are those of an uninterrupted run (the encoders restart, see `MP4Writer.checkpoint`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from liveavatar.engine.resume import (
    COMMENT_PREFIX,
    Checkpointer,
    JobIdentity,
    SavedState,
    read_state,
    remove_state,
    state_nbytes,
    state_path,
    states_beside,
)
from liveavatar.engine.session import GenerationOptions, Inputs, Session
from liveavatar.errors import Terminated, UserError
from liveavatar.io import media
from liveavatar.io.mp4 import MP4Writer, read_comment
from liveavatar.io.output import OutputFile

DONE = "done"


class StopAtBlock:
    """A SIGTERM that arrives while a render with checkpoints makes blocks (a cluster preempting the
    job, `kill`) does not cut the block short: the render finishes it, saves a checkpoint and then
    stops (raising `Terminated`), so `--resume` loses nothing. A second SIGTERM, or one outside the
    block loop (setup, a render without checkpoints), stops at once as before; the checkpoint written
    before stays valid either way (states are written atomically)."""

    def __init__(self):
        self.armed = False
        self.requested = False

    def request(self) -> bool:
        """Ask the armed render to stop after its block; False if none is armed or it was asked before."""
        if not self.armed or self.requested:
            return False
        self.requested = True
        return True


STOP = StopAtBlock()  # the signal handler of the CLI asks it; `Render.run` arms it


def _ignore_sigterm() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass
class Job:
    """A checked render request for one output file."""

    image: str
    audio: str
    prompt: str
    opts: GenerationOptions
    inputs: Inputs
    save_file: str
    identity: JobIdentity
    overwrite: bool = False
    rename_if_taken: bool = False
    checkpoint_every: int | None = None  # None: auto (overhead budget), 0: never
    dump_dir: str | None = None  # raw frames and audio of every chunk, before encoding (tests, debugging)

    def output(self) -> OutputFile:
        return OutputFile(self.save_file, what="output video", overwrite=self.overwrite,
                          inputs=(self.image, self.audio), rename_if_taken=self.rename_if_taken)

    @property
    def comment(self) -> str:
        return COMMENT_PREFIX + self.identity.fingerprint()


def locate(job: Job, resume: bool) -> SavedState | str | None:
    """How `job` starts: `DONE` (its finished video exists), the saved state to continue (with
    `resume`), or None (from the first block). A state of another job refuses the resume with one
    line naming what changed; a state whose partial video is gone is removed."""
    if not resume:
        fix_seed(job)
        return None
    usable, refused = [], None
    for path in states_beside(job.save_file):
        st = read_state(path)
        if not st.partial.exists():  # published (killed before its state was removed) or deleted
            remove_state(path)
            continue
        why = job.identity.difference(st.job)
        if why is None:
            usable.append(st)
        else:
            refused = (path, why)
    if usable:
        st = max(usable, key=lambda s: s.block)
        if job.identity.options["seed"] is None:  # a random seed (-1): the saved run's
            job.opts = replace(job.opts, seed=int(st.job.options["seed"]))
        job.identity = st.job
        job.identity.image[0], job.identity.audio[0] = job.image, job.audio
        return st
    if refused:
        path, why = refused
        raise UserError(f"cannot resume {job.save_file!r} from {str(path)!r}: {why}; run with the arguments and "
                        "inputs it was started with, or without --resume to start anew (the partial video is kept)")
    fix_seed(job)
    if os.path.exists(job.save_file) and read_comment(job.save_file) == job.comment:
        return DONE
    return None


def fix_seed(job: Job) -> None:
    """A job starting anew with a random seed: the seed drawn is part of its identity."""
    if job.identity.options["seed"] is None:
        job.identity.options["seed"] = job.opts.seed


class Render:
    """Runs a `Job` on a loaded pipeline (see the module docstring). After `run()` (or an exception)
    `frames`, `partial_path`, `resumed_from` and `checkpoints` say what happened."""

    def __init__(self, pipe, job: Job, saved: SavedState | None = None, desc: str | None = None):
        self.pipe, self.job, self.saved, self.desc = pipe, job, saved, desc
        self.frames = 0
        self.blocks = 0  # blocks made by this run
        self.resumed_from = saved.block if saved is not None else 0
        self.checkpoints = Checkpointer(job.checkpoint_every)
        self.writer: MP4Writer | None = None
        self.session: Session | None = None
        self.first_frame: float | None = None
        self.path: Path | None = None  # the published video
        self.stopped_with_checkpoint = False  # stopped by a SIGTERM after saving the state of its last block

    @property
    def partial_path(self) -> Path | None:
        return self.writer.partial_path if self.writer is not None else None

    def _open(self, out: OutputFile) -> None:
        """The session and the writer: new ones, or the saved ones continued."""
        job, pipe, preset = self.job, self.pipe, self.pipe.preset
        geometry = dict(width=job.inputs.width, height=job.inputs.height, fps=preset.fps, audio=True,
                        sample_rate=media.SAMPLE_RATE, comment=job.comment)
        if self.saved is None:
            self.session = pipe.session(job.inputs, prompt=job.prompt, options=job.opts)
            self.writer = MP4Writer(out, **geometry)
            return
        st = self.saved
        self.session = Session.restore(pipe, st.session, audio=job.inputs.speech)
        out.resume(st.partial, int(st.writer["bytes"]), st.writer["sha256"])
        writer = dict(st.writer, audio=st.writer["audio"].numpy() if st.writer["audio"] is not None else None)
        self.writer = MP4Writer(out, **geometry, resume=writer)
        self.frames = int(st.writer["frames"])
        self.saved = None  # the tensors were copied into the session; the mapped file is not needed

    def run(self) -> Path:
        """Render (or continue) the video; returns the published file."""
        from tqdm import tqdm

        job, t0 = self.job, time.time()
        out = job.output()
        try:
            self._open(out)
            session = self.session
            for line in session.warnings:
                print(f"warning: {line}", file=sys.stderr)
            start = f", resumed at block {self.resumed_from}" if self.resumed_from else ""
            print(f"{job.inputs.width}x{job.inputs.height} (WxH), {session.num_frames} frames in "
                  f"{session.num_blocks} blocks ({session.num_clips} clips), seed {job.opts.seed}{start}, setup "
                  f"{time.time() - t0:.1f}s -> {out.path}", file=sys.stderr)
            bar = tqdm(total=session.num_blocks, initial=self.resumed_from, unit="block", file=sys.stderr,
                       dynamic_ncols=True, desc=self.desc)
            t1, made = time.time(), 0
            self.checkpoints.t0 = time.perf_counter()
            STOP.requested = False  # before arming: a request can only come for this render
            STOP.armed = self.checkpoints.every != 0
            try:
                for chunk in session:
                    self.writer.write(chunk.frames, chunk.audio)
                    if job.dump_dir:
                        dump_chunk(job.dump_dir, chunk)
                    self.first_frame = self.first_frame or time.time() - t0
                    self.frames += len(chunk.frames)
                    made += len(chunk.frames)
                    self.blocks += 1
                    stop = STOP.requested and not session.done
                    if not session.done and (stop or self.checkpoints.due(
                            self.blocks, lambda: state_nbytes(session.state_dict()))):
                        failed = self.checkpoints.save(state_path(self.writer.partial_path), job.identity,
                                                       self.writer.checkpoint(), session.state_dict())
                        if failed:
                            bar.write(f"warning: {failed}", file=sys.stderr)
                            STOP.armed = False  # no more checkpoints: a SIGTERM stops at once
                        stop = STOP.requested  # also one that came while the state was written
                        self.stopped_with_checkpoint = stop and not failed
                    bar.set_postfix_str(f"{self.frames} frames, {made / (time.time() - t1):.2f} fps")
                    bar.update(1)
                    if stop:
                        _ignore_sigterm()  # the cleanup that follows must not be cut short
                        raise Terminated()
            finally:
                STOP.armed = STOP.requested = False
                bar.close()  # ends its line: any message after it stands alone
            partial = self.writer.partial_path
            path = self.writer.close()
        except BaseException:
            if self.writer is not None:
                self.writer.abort()
            else:
                out.keep()
            raise
        finally:
            if self.session is not None:
                self.session.close()
        remove_state(state_path(partial))
        self.path = path
        return path


def dump_chunk(folder: str | os.PathLike, chunk) -> None:
    """The chunk's frames [T, H, W, 3] uint8 and audio samples as `chunk-<block>.npz` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".chunk-{chunk.index:06d}.{os.getpid()}.npz"
    np.savez(tmp, frames=chunk.frames, audio=chunk.audio, frame_start=chunk.frame_start)
    os.replace(tmp, folder / f"chunk-{chunk.index:06d}.npz")


def read_dump(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The frames and audio of every chunk dumped in `folder`, in order."""
    files = sorted(Path(folder).glob("chunk-*.npz"))
    parts = [np.load(f) for f in files]
    return (np.concatenate([p["frames"] for p in parts]), np.concatenate([p["audio"] for p in parts]))


__all__ = ["DONE", "STOP", "Job", "Render", "StopAtBlock", "dump_chunk", "fix_seed", "locate", "read_dump"]
