"""The scripts a GPU session runs in one call still run: `benchmarks/gpu_all.py` on the CPU with the
tiny preset (the same code path as on a GPU, one configuration) and `benchmarks/bench_offload.py
--tiny` (streamed blocks give the resident velocity exactly). A GPU is lent rarely; a script that broke
since would waste it."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=str(REPO), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_gpu_all_runs_on_the_cpu_with_the_tiny_preset(tmp_path):
    out = tmp_path / "gpu_all"
    _run("benchmarks/gpu_all.py", "--device", "cpu", "--preset", "tiny", "--size", "128*128", "--num_clip", "1",
         "--skip-tests", "--configs", "bf16-eager", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert [(r["part"], r["status"]) for r in results] == [("bf16-eager", "ok")], results
    assert "frames/s" in Path(f"{out}.md").read_text()


def test_bench_offload_tiny_streams_the_resident_velocity():
    stdout = _run("benchmarks/bench_offload.py", "--tiny")
    assert "max |velocity difference|: 0.000e+00" in stdout, stdout
