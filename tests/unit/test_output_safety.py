"""Nothing is lost: `liveavatar generate` under signals, concurrent runs, retries, a full disk and a
removed output folder (real processes on the tiny preset), and the `OutputFile` rules behind them.

Every case checks the exit code, a one-line message without traceback, that the partial video left
behind plays the frames reported, and that no earlier file was changed.
"""

import hashlib
import os
import re
import resource
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

from liveavatar.errors import UserError
from liveavatar.io.output import OutputFile

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    rng = np.random.default_rng(5)
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(d / "face.png")
    t = np.arange(16000 * 4) / 16000
    sf.write(d / "speech.wav", (0.3 * np.sin(2 * np.pi * 190 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32),
             16000)
    return d


def _argv(inputs: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "liveavatar", "generate", "--preset", "tiny", "--size", "128*128",
            "--image", str(inputs / "face.png"), "--audio", str(inputs / "speech.wav"), "--save_file", str(out),
            *extra]


def _shell_status(returncode: int) -> int:
    """The exit status a shell reports ($?): 128 + N for a process ended by signal N. After a Ctrl-C
    that the run handled (its one-line message printed, exit 130), CPython can still end the process
    by re-raising SIGINT when the interrupt first surfaced inside code run through its C API; the
    shell sees 130 either way."""
    return 128 - returncode if returncode < 0 else returncode


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited ignore: give
    # the run the Ctrl-C a terminal would deliver, however this test suite was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv, preexec_fn=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def setup() -> None:
        _default_sigint()
        if preexec_fn is not None:
            preexec_fn()

    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.Popen(argv, cwd=str(REPO), env=env, text=True, preexec_fn=setup, **kw)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def _last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    return lines[-1]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_during_generation_stops_cleanly_and_keeps_a_playable_partial(inputs, tmp_path, sig, code, name):
    out = tmp_path / "video.mp4"
    proc = _start(_argv(inputs, out))
    partial = tmp_path / "video.partial.mp4"
    _wait_for(lambda: partial.exists() and partial.stat().st_size > 0, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert _shell_status(proc.returncode) == code, err
    assert "Traceback" not in err
    last = _last_line(err)
    # SIGTERM finishes the block under way and saves a checkpoint first (tests/unit/test_resume.py)
    resumable = "; run the same command with --resume to continue it" if sig == signal.SIGTERM else ""
    m = re.fullmatch(rf"error: stopped by {name}; the partial video '.*video\.partial\.mp4' plays its (\d+) "
                     rf"frames{re.escape(resumable)}", last)
    assert m, last
    assert not out.exists() and _frames(partial) == int(m.group(1)) >= 9


# Setup held open: encoding the reference announces itself on stderr, then takes 60 s.
SLOW_SETUP = """
import sys, time
from liveavatar.engine import conditioning
real = conditioning.encode_conditioning
def slow(*a, **k):
    print("IN-SETUP", file=sys.stderr, flush=True)
    time.sleep(60)
    return real(*a, **k)
conditioning.encode_conditioning = slow
from liveavatar.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_during_setup_leaves_no_file_and_no_folder(inputs, tmp_path, sig):
    out = tmp_path / "new" / "deeper" / "video.mp4"
    log = tmp_path / "stderr.log"
    with open(log, "w") as err_file:
        argv = _argv(inputs, out)
        proc = _start([argv[0], "-c", SLOW_SETUP, *argv[3:]], stderr=err_file)
        _wait_for(lambda: "IN-SETUP" in log.read_text(), proc)  # the model is built; no chunk can exist yet
        proc.send_signal(sig)
        proc.wait(timeout=120)
    err = log.read_text()
    assert "Traceback" not in err
    assert _shell_status(proc.returncode) == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: 137}[sig]
    assert not (tmp_path / "new").exists()


def test_concurrent_runs_with_the_same_output_both_keep_their_video(inputs, tmp_path):
    out = tmp_path / "same.mp4"
    procs = [_start(_argv(inputs, out, "--base_seed", str(s), "--num_clip", "1")) for s in (1, 2)]
    errs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    saved = sorted(re.search(r"saved (\S+) ", o).group(1) for o, _ in errs)
    assert saved == [str(tmp_path / "same-2.mp4"), str(out)]
    assert _frames(out) == _frames(tmp_path / "same-2.mp4") == 45
    assert _sha(out) != _sha(tmp_path / "same-2.mp4")  # each run kept its own video
    assert not list(tmp_path.glob("*partial*"))


def test_a_retry_never_touches_the_partial_file_of_a_killed_run(inputs, tmp_path):
    out = tmp_path / "job.mp4"
    proc = _start(_argv(inputs, out))
    partial = tmp_path / "job.partial.mp4"
    _wait_for(lambda: partial.exists() and _frames_or_zero(partial) >= 21, proc)
    proc.kill()
    proc.communicate()
    kept = _sha(partial)
    retry = _start(_argv(inputs, out, "--num_clip", "1"))
    _, err = retry.communicate(timeout=600)
    assert retry.returncode == 0, err
    assert _sha(partial) == kept and _frames(partial) >= 21  # still there to resume from
    assert _frames(out) == 45


def _frames_or_zero(path: Path) -> int:
    try:
        return _frames(path)
    except (av.FFmpegError, OSError):
        return 0


def test_a_full_disk_is_one_line_and_keeps_what_was_written(inputs, tmp_path):
    out = tmp_path / "full.mp4"

    def limit():  # writes past 80 KB (the first chunk is about 45 KB) fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (80_000, resource.RLIM_INFINITY))

    proc = _start(_argv(inputs, out), preexec_fn=limit)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    last = _last_line(err)
    m = re.fullmatch(r"error: writing '.*full\.partial\.mp4' failed \(the disk is full\); it keeps the (\d+) "
                     r"frames written so far and plays", last)
    assert m, last
    assert _frames(tmp_path / "full.partial.mp4") == int(m.group(1)) > 0


def test_a_removed_output_folder_is_reported_at_once(inputs, tmp_path):
    folder = tmp_path / "outputs"
    proc = _start(_argv(inputs, folder / "v.mp4"))
    _wait_for(lambda: (folder / "v.partial.mp4").exists(), proc)
    shutil.rmtree(folder)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err
    assert re.fullmatch(r"error: the output video '.*v\.partial\.mp4' was removed while it was written .*",
                        _last_line(err)), err


# ---- the rules of OutputFile ----------------------------------------------------------------------


def test_nothing_exists_before_the_first_bytes_and_created_folders_go_away(tmp_path):
    out = OutputFile(tmp_path / "a" / "b" / "v.mp4")
    assert not (tmp_path / "a").exists()
    out.keep()  # stopped before any output
    assert list(tmp_path.iterdir()) == []


def test_partial_names_never_reuse_an_existing_partial(tmp_path):
    (tmp_path / "v.partial.mp4").write_bytes(b"a killed run's work")
    out = OutputFile(tmp_path / "v.mp4")
    f = out.begin(b"first")
    assert out.partial_path == tmp_path / "v.partial-2.mp4"
    f.write(b" rest")
    assert out.finish() == tmp_path / "v.mp4"
    assert (tmp_path / "v.mp4").read_bytes() == b"first rest"
    assert (tmp_path / "v.partial.mp4").read_bytes() == b"a killed run's work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4", "v.partial.mp4"]  # no temporary left


def test_overwrite_replaces_only_the_file_that_was_there(tmp_path):
    p = tmp_path / "v.mp4"
    p.write_bytes(b"old")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        OutputFile(p)
    out = OutputFile(p, overwrite=True)
    out.begin(b"new")
    assert out.finish() == p and p.read_bytes() == b"new"
    out = OutputFile(p, overwrite=True)
    out.begin(b"newer")
    p.unlink()
    p.write_bytes(b"another run's result, written after this one started")
    assert out.finish() == tmp_path / "v-2.mp4"
    assert p.read_bytes().startswith(b"another run")


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    p = tmp_path / "v.mp4"
    out = OutputFile(p)
    out.begin(b"mine")
    p.write_bytes(b"theirs")
    assert out.finish() == tmp_path / "v-2.mp4"
    assert p.read_bytes() == b"theirs" and (tmp_path / "v-2.mp4").read_bytes() == b"mine"


def test_an_input_is_never_an_output(tmp_path):
    src = tmp_path / "speech.wav"
    src.write_bytes(b"RIFF")
    (tmp_path / "link.mp4").symlink_to(src)
    for name in ("speech.wav", "link.mp4", "./speech.wav"):
        with pytest.raises(UserError, match="is the input"):
            OutputFile(tmp_path / name, overwrite=True, inputs=(str(src),))
    assert src.read_bytes() == b"RIFF"


def test_an_encoder_failure_is_one_line_and_keeps_what_was_written(tmp_path):
    from liveavatar.io.mp4 import MP4Writer

    w = MP4Writer(tmp_path / "v.mp4", width=64, height=64, audio=True)
    frames = np.zeros((12, 64, 64, 3), np.uint8)
    w.write(frames, np.zeros(12 * 640, np.float32))

    class Broken:
        def encode(self, frame):
            raise av.FFmpegError(-5, "Input/output error")

    w._video = Broken()
    with pytest.raises(UserError, match=r"the encoder failed on frame 12 .*keeps the 12 frames written so far"):
        w.write(frames, np.zeros(12 * 640, np.float32))
    w.abort()
    assert _frames(w.partial_path) == 12
