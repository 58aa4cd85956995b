"""Resuming killed renders (`generate --resume`) on the tiny preset, in real processes killed with -9.

A render is killed at random points (during setup, between blocks, in the middle of writing a
checkpoint, during the setup of a resume) and resumed until it finishes: the raw frames and audio
before encoding (`--dump_chunks`) must equal an uninterrupted run's exactly, and the decoded files
must agree within encoder noise. A resume with another image, audio or seed is refused in one line
and touches nothing. The MP4 writer's checkpoint/continue is also checked on its own.
"""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from tiny_dit import one_thread  # noqa: F401  (autouse: single-threaded module)

from liveavatar.cli import main
from liveavatar.engine.resume import read_state
from liveavatar.errors import UserError
from liveavatar.io.mp4 import MP4Writer, read_comment
from liveavatar.io.output import OutputFile
from liveavatar.render import read_dump

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SEED = random.randrange(10**6)  # the kill points; printed with any failure
RNG = random.Random(SEED)

# A slowed checkpoint write: half of the state's bytes reach the temporary file, then the process
# hangs there (and is killed) as if the disk were slow.
TORN_WRITE = """
import io, os, sys, time, torch
real = torch.save
def torn(obj, f, *a, **k):
    buf = io.BytesIO(); real(obj, buf, *a, **k); data = buf.getvalue()
    f.write(data[:len(data) // 2]); f.flush(); os.fsync(f.fileno())
    print("TORN-WRITE", file=sys.stderr, flush=True); time.sleep(600)
torch.save = torn
from liveavatar.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wav(path, seconds, f0=190.0):
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * f0 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume-in")
    rng = np.random.default_rng(5)
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(d / "face.png")
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(d / "other.png")
    _wav(d / "speech.wav", 2.3)  # 5 blocks: the sink refresh (block 4) is after the resume points
    _wav(d / "other.wav", 2.3, f0=230.0)
    return d


def _gen(inputs: Path, folder: Path, *extra, image="face.png", audio="speech.wav") -> list[str]:
    return ["generate", "--preset", "tiny", "--size", "128*128", "--image", str(inputs / image), "--audio",
            str(inputs / audio), "--save_file", str(folder / "video.mp4"), "--dump_chunks", str(folder / "dump"),
            "--checkpoint_every", "2", *extra]


def _start(argv: list[str], code: str | None = None) -> subprocess.Popen:
    head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "liveavatar"]
    return subprocess.Popen(head + argv, cwd=str(REPO), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, (SEED, proc.communicate())
        assert time.time() - t0 < timeout, (SEED, "timed out")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with av.open(str(path)) as c:
        video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return video, audio


@pytest.fixture(scope="module")
def killed(inputs, tmp_path_factory):
    """A render killed during setup, then resumed (nothing to resume: it starts anew) and killed between
    blocks after its checkpoint at block 2; the uninterrupted reference runs alongside."""
    ref_dir = tmp_path_factory.mktemp("reference")
    reference = _start(_gen(inputs, ref_dir, "--checkpoint_every", "0"))
    d = tmp_path_factory.mktemp("killed")
    proc = _start(_gen(inputs, d))
    time.sleep(RNG.uniform(0.5, 2.5))  # importing, building the model, encoding: no block yet
    assert not (d / "video.partial.mp4").exists()
    _kill(proc)
    assert list(d.iterdir()) == []  # nothing was left behind
    proc = _start(_gen(inputs, d, "--resume"))
    _wait_for(lambda: (d / "dump" / "chunk-000002.npz").exists(), proc)
    time.sleep(RNG.uniform(0.0, 0.3))  # somewhere in block 3 (encoding, writing, dumping)
    _kill(proc)
    state = read_state(d / "video.partial.state")
    assert state.block == 2, SEED
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    return d, ref_dir


def test_killed_at_random_points_resumes_to_the_frames_and_audio_of_an_uninterrupted_run(inputs, killed,
                                                                                         tmp_path):
    src, ref_dir = killed
    d = tmp_path / "job"
    shutil.copytree(src, d)
    state, partial = d / "video.partial.state", d / "video.partial.mp4"
    kept = _sha(state)

    # killed during the setup of a resume: the state is untouched, the partial keeps its checkpointed part
    proc = _start(_gen(inputs, d, "--resume"))
    time.sleep(RNG.uniform(0.3, 2.0))
    _kill(proc)
    assert _sha(state) == kept and partial.stat().st_size >= read_state(state).writer["bytes"]

    # killed in the middle of writing the checkpoint at block 4: the torn temporary file is ignored
    proc = _start(_gen(inputs, d, "--resume"), code=TORN_WRITE)
    _wait_for(lambda: any(d.glob(".video.partial.state.*.tmp")), proc)
    _wait_for(lambda: (d / "dump" / "chunk-000003.npz").exists(), proc)
    time.sleep(0.5)
    _kill(proc)
    assert _sha(state) == kept and read_state(state).block == 2

    proc = _start(_gen(inputs, d, "--resume"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed at block 2" in err and "saved" in out
    assert sorted(p.name for p in d.iterdir()) == ["dump", "video.mp4"]  # no partial, state or temporary left

    frames, audio = read_dump(d / "dump")
    ref_frames, ref_audio = read_dump(ref_dir / "dump")
    assert frames.shape == ref_frames.shape == (55, 128, 128, 3)  # 2.3 s of speech, 5 blocks
    assert np.array_equal(frames, ref_frames) and np.array_equal(audio, ref_audio)

    video, sound = _decode(d / "video.mp4")
    ref_video, ref_sound = _decode(ref_dir / "video.mp4")
    assert video.shape == ref_video.shape and sound.shape == ref_sound.shape
    # the encoders restarted at block 2: the resumed file differs from the reference by far less than
    # both differ from the frames they encode, and its audio by less than AAC's own error
    coding = np.abs(ref_video.astype(int) - ref_frames).mean()
    assert np.abs(video.astype(int) - ref_video).mean() < 0.05 * coding
    assert np.abs(video.astype(int) - frames).mean() < 1.05 * coding
    assert np.abs(sound - ref_sound).max() < 0.01
    assert read_comment(d / "video.mp4") == read_comment(ref_dir / "video.mp4")  # the same job


def test_sigterm_between_checkpoints_saves_the_block_it_finishes_and_resume_loses_nothing(inputs, killed, tmp_path):
    """SIGTERM (a cluster preempting the job) while blocks are made: the render finishes its block,
    saves a checkpoint there (not only at the last periodic one), exits 143 saying --resume continues
    it; the resumed run gives exactly the uninterrupted frames and audio."""
    _, ref_dir = killed
    d = tmp_path / "job"
    argv = _gen(inputs, d, "--checkpoint_every", "100")  # periodic checkpoints never come due here
    proc = _start(argv)
    _wait_for(lambda: (d / "dump" / "chunk-000001.npz").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "stopping after this block, with a checkpoint" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM; the partial video") and last.endswith(
        "run the same command with --resume to continue it"), last
    state = read_state(d / "video.partial.state")
    made = len(list((d / "dump").glob("chunk-*.npz")))
    assert state.block == made >= 2  # the block under way when the signal came was finished and saved
    proc = _start([*argv, "--resume"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed at block {made}" in err and "saved" in out
    frames, audio = read_dump(d / "dump")
    ref_frames, ref_audio = read_dump(ref_dir / "dump")
    assert np.array_equal(frames, ref_frames) and np.array_equal(audio, ref_audio)


SLOW_BLOCKS = """
import sys, time
from liveavatar.io import mp4
real = mp4.MP4Writer.write
def slow(self, *a, **k):
    time.sleep(1.5)
    return real(self, *a, **k)
mp4.MP4Writer.write = slow
from liveavatar.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_sigterm_or_no_checkpoints_stops_at_once(inputs, tmp_path):
    """With checkpoints off (`--checkpoint_every 0`) SIGTERM stops at once, as Ctrl-C does; so does a
    second SIGTERM while the first waits for its block to end (blocks slowed to 1.5 s here)."""
    for case in ("off", "twice"):
        d = tmp_path / case
        every = "0" if case == "off" else "100"
        log = tmp_path / f"{case}.log"
        with open(log, "w") as err_file:
            proc = subprocess.Popen([sys.executable, "-c", SLOW_BLOCKS, *_gen(inputs, d, "--checkpoint_every", every)],
                                    cwd=str(REPO), env=ENV, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
            _wait_for(lambda: (d / "dump" / "chunk-000000.npz").exists(), proc)  # noqa: B023
            proc.send_signal(signal.SIGTERM)
            if case == "twice":
                _wait_for(lambda: "stopping after this block" in log.read_text(), proc)  # noqa: B023
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        err = log.read_text()
        assert proc.returncode == 143 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: stopped by SIGTERM; the partial video") and "--resume" not in last, last
        assert not (d / "video.partial.state").exists()  # stopped before any checkpoint
        assert len(list((d / "dump").glob("chunk-*.npz"))) <= 2


@pytest.mark.parametrize("change,needle", [
    ({"image": "other.png"}, "the image"),
    ({"audio": "other.wav"}, "the audio"),
    (["--base_seed", "7"], "--base_seed is 7 but the saved render used 42"),
    (["--num_clip", "1"], "--num_clip is 1 but the saved render used None"),
    (["--base_seed", "-1", "--num_clip", "1"], "--num_clip is 1"),  # a random seed matches the saved one
], ids=["image", "audio", "seed", "num_clip", "random-seed"])
def test_a_resume_with_changed_inputs_or_arguments_is_refused(inputs, killed, tmp_path, capsys, change, needle):
    d = tmp_path / "job"
    shutil.copytree(killed[0], d)
    before = {p.name: _sha(p) for p in d.iterdir() if p.is_file()}
    argv = _gen(inputs, d, "--resume", **change) if isinstance(change, dict) else _gen(inputs, d, "--resume", *change)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: cannot resume") and "\n" not in err, err
    assert needle in err, err
    assert {p.name: _sha(p) for p in d.iterdir() if p.is_file()} == before  # nothing changed


def test_resume_of_a_finished_job_does_nothing_and_a_new_run_keeps_the_resumable_partial(inputs, killed, tmp_path,
                                                                                           capsys):
    d = tmp_path / "job"
    shutil.copytree(killed[1], d)  # the finished reference: same job, no checkpoints
    assert main(_gen(inputs, d, "--checkpoint_every", "0", "--resume")) == 0
    assert "nothing to resume" in capsys.readouterr().out
    e = tmp_path / "killed"
    shutil.copytree(killed[0], e)
    kept = _sha(e / "video.partial.mp4")
    assert main(_gen(inputs, e, "--num_clip", "1", "--checkpoint_every", "1")) == 0
    err = capsys.readouterr().err
    assert "can be continued from block 2 with --resume" in err
    assert _sha(e / "video.partial.mp4") == kept and (e / "video.partial.state").exists()
    assert (e / "video.mp4").exists() and not (e / "video.partial-2.state").exists()  # its own state removed


# ---- the writer on its own --------------------------------------------------------------------------


def _chunks(n: int):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (64, 64, 3))
    for k in range(n):
        frames = np.stack([np.roll(base, 2 * (12 * k + i), axis=1) for i in range(12)]).astype(np.uint8)
        t = (np.arange(12 * 640) + 12 * 640 * k) / 16000
        yield frames, (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


def test_writer_continues_a_checkpointed_file_after_a_kill(tmp_path):
    chunks = list(_chunks(6))
    with MP4Writer(tmp_path / "ref.mp4", width=64, height=64, audio=True) as w:
        for f, a in chunks:
            w.write(f, a)
    first = MP4Writer(OutputFile(tmp_path / "v.mp4"), width=64, height=64, audio=True, comment="job x")
    for f, a in chunks[:3]:
        first.write(f, a)
    cp = first.checkpoint()
    first.write(*chunks[3])  # written after the checkpoint, then "killed": cut away on resume
    first.abort()
    partial = tmp_path / "v.partial.mp4"
    assert partial.stat().st_size > cp["bytes"]

    out = OutputFile(tmp_path / "v.mp4")
    out.resume(partial, cp["bytes"], cp["sha256"])
    w = MP4Writer(out, width=64, height=64, audio=True, comment="job x", resume=cp)
    for f, a in chunks[3:]:
        w.write(f, a)
    assert w.close() == tmp_path / "v.mp4" and not partial.exists()
    video, sound = _decode(tmp_path / "v.mp4")
    ref_video, ref_sound = _decode(tmp_path / "ref.mp4")
    assert video.shape == ref_video.shape == (72, 64, 64, 3) and sound.shape == ref_sound.shape
    coding = np.abs(ref_video.astype(int) - np.concatenate([f for f, _ in chunks])).mean()
    assert np.abs(video.astype(int) - ref_video).mean() < 0.1 * coding
    assert np.abs(sound - ref_sound).max() < 0.01  # no click where the AAC encoder restarted
    assert read_comment(tmp_path / "v.mp4") == "job x"


def test_a_changed_or_busy_partial_file_is_not_resumed(tmp_path):
    w = MP4Writer(OutputFile(tmp_path / "v.mp4"), width=64, height=64, audio=True)
    f, a = next(_chunks(1))
    w.write(f, a)
    cp = w.checkpoint()
    with pytest.raises(UserError, match="another running process is writing"):
        OutputFile(tmp_path / "v.mp4").resume(w.partial_path, cp["bytes"], cp["sha256"])  # still open and locked
    w.abort()
    partial = tmp_path / "v.partial.mp4"
    data = bytearray(partial.read_bytes())
    data[len(data) // 2] ^= 1
    partial.write_bytes(bytes(data))
    with pytest.raises(UserError, match="differs from the one the saved state was made with"):
        OutputFile(tmp_path / "v.mp4").resume(partial, cp["bytes"], cp["sha256"])
    partial.write_bytes(bytes(data[:100]))
    with pytest.raises(UserError, match="is shorter than"):
        OutputFile(tmp_path / "v.mp4").resume(partial, cp["bytes"], cp["sha256"])
