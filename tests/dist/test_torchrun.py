"""`liveavatar generate` under real `torchrun` launches (gloo on CPU, tiny preset).

- Two "nodes" on this machine (two torchrun launches meeting at a local c10d rendezvous, 2 ranks
  each: 2 pipeline stages of 2 Ulysses ranks) write the video of the single-process command.
- A rank killed mid-run (SIGKILL) or frozen (SIGSTOP) ends every rank within the timeout set with
  `--dist_timeout`, with one line naming that rank; no process is left, and the decoding rank's
  partial video plays.
"""

import os
import re
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

sys.path.insert(0, str(Path(__file__).parent))
from ranks import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    rng = np.random.default_rng(6)
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(d / "face.png")
    for name, seconds in (("short", 2.3), ("long", 12.0)):
        t = np.arange(int(16000 * seconds)) / 16000
        sf.write(d / f"{name}.wav", (0.3 * np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32),
                 16000)
    return d


def _generate(d: Path, audio: str, out: Path, *extra) -> list[str]:
    return ["-m", "liveavatar", "generate", "--preset", "tiny", "--size", "128*128", "--image", str(d / "face.png"),
            "--audio", str(d / audio), "--save_file", str(out), "--num_clip", "2", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def test_two_nodes_write_the_single_process_video(files, tmp_path):
    single = tmp_path / "single.mp4"
    r = subprocess.run([sys.executable, *_generate(files, "short.wav", single)], env=_env(), cwd=str(REPO),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "two_nodes.mp4"
    port = free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(n),
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t",
                               *_generate(files, "short.wav", out, "--num_gpus_dit", "4", "--ulysses_size", "2",
                                          "--dit_fsdp", "--dist_timeout", "60")],
                              env=_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    assert np.array_equal(_frames(out), _frames(single))


def _rank_pid(rank: int, parent: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank under `parent`."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            stat = (p / "stat").read_text().split()
        except OSError:
            continue
        if int(stat[3]) == parent and f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return int(p.name)
    return None


def _children(parent: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().split()[3]) == parent:
                    out.append(int(p.name))
            except OSError:
                pass
    return out


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_rank_ends_every_rank_with_one_line_naming_it(files, tmp_path, how):
    out = tmp_path / "lost.mp4"
    timeout = 10
    proc = subprocess.Popen([*TORCHRUN, "--nproc_per_node", "3", "--master_port", str(free_port()),
                             *_generate(files, "long.wav", out, "--num_gpus_dit", "2", "--enable_vae_parallel",
                                        "--dist_timeout", str(timeout))],
                            env=_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    partial = tmp_path / "lost.partial.mp4"
    t0 = time.time()
    while not partial.exists():
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[0]
        time.sleep(0.1)
    victim = _rank_pid(1, proc.pid)
    workers = _children(proc.pid)
    assert victim is not None and len(workers) == 3
    t_lost = time.time()
    os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    log = proc.communicate(timeout=timeout + 120)[0]
    elapsed = time.time() - t_lost
    assert proc.returncode != 0
    assert elapsed < timeout + 60, elapsed  # the timeout, then torchrun's grace period for stopping the rest
    errors = _errors(log)
    named = [e for e in errors if re.fullmatch(r"error: rank 1, denoise stage 1 \(steps 2-3\): stopped answering "
                                               r"\(killed, crashed or frozen\)", e)]
    assert len(named) == 1, log[-3000:]
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in workers)  # no orphans
    kept = re.search(r"the partial video '.*lost\.partial\.mp4' plays its (\d+) frames", log)
    assert kept and len(_frames(partial)) == int(kept.group(1)) > 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
