"""`liveavatar batch jobs.jsonl`: many renders on one loaded model, killable and rerunnable.

Each line of the jobs file is one JSON object: `image`, `audio`, `save_file`, optionally `prompt`
and any per-video `generate` option (`size`, `num_clip`, `base_seed`, `sample_steps`, ...). The model
(preset, weights, device, runtime flags) is the batch's own, given on its command line, and is loaded
once, before the first job that renders. Every job runs as `generate --resume` would: a job whose
finished video is there is skipped, a job killed mid-way continues from its last checkpoint, any
other starts anew. A bad job (a missing file, unreadable speech, an unknown option, a bad line) is
reported and the batch goes on. Each job's outcome is appended to the results file as one JSON
line: `ok` (with frames, the block it resumed at and the blocks it rendered), `error` (with the
one-line message) or `skipped` (already done).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from liveavatar.errors import UserError

# Keys of a job line and the `generate` flag each one sets (True: a switch).
JOB_KEYS = {
    "image": "--image", "audio": "--audio", "prompt": "--prompt", "save_file": "--save_file",
    "size": "--size", "num_clip": "--num_clip", "infer_frames": "--infer_frames",
    "sample_steps": "--sample_steps", "base_seed": "--base_seed", "overwrite": True,
    "audio_offset_frames": "--audio_offset_frames", "audio_encoding": "--audio_encoding",
    "audio_window": "--audio_window", "checkpoint_every": "--checkpoint_every", "dump_chunks": "--dump_chunks",
    "sample_guide_scale": "--sample_guide_scale", "sample_solver": "--sample_solver",
    "sample_shift": "--sample_shift",
}
REQUIRED = ("image", "audio", "save_file")
MODEL_KEYS = ("preset", "ckpt_dir", "lora_path_dmd", "lora_path", "device", "fp8", "resident_blocks", "kv_on_device",
              "kv_fp8", "kv_sink", "t5_cpu", "offload_model", "offload_kv_cache", "gpu_memory", "attention")


@dataclass
class Line:
    number: int  # 1-based line number in the jobs file
    job: dict | None
    problem: str | None = None


def read_jobs(path: str | os.PathLike) -> list[Line]:
    """The jobs of a JSONL file, one per non-empty line; a line that is not a JSON object is a bad job."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"jobs file {str(path)!r} does not exist; pass a JSONL file with one job per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"jobs file {str(path)!r} cannot be read ({e}); pass a UTF-8 JSONL file") from None
    lines = []
    for i, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            job = json.loads(raw)
        except json.JSONDecodeError as e:
            lines.append(Line(i, None, f"line {i} is not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(job, dict):
            lines.append(Line(i, None, f"line {i} is not a JSON object with image, audio and save_file"))
            continue
        lines.append(Line(i, job))
    if not lines:
        raise UserError(f"jobs file {str(path)!r} holds no job; write one JSON object per line, e.g. "
                        '{"image": "face.png", "audio": "speech.wav", "save_file": "out.mp4"}')
    return lines


def job_argv(job: dict) -> list[str]:
    """The `generate` flags of a job line (UserError for an unknown or misplaced key)."""
    for key in REQUIRED:
        if not isinstance(job.get(key), str) or not job[key]:
            raise UserError(f"the job has no {key!r} (every job needs image, audio and save_file)")
    argv = []
    for key, value in job.items():
        if key in MODEL_KEYS:
            raise UserError(f"{key!r} is a model option: give it once on the batch command line, not per job")
        flag = JOB_KEYS.get(key)
        if flag is None:
            raise UserError(f"unknown job key {key!r}; allowed: {', '.join(JOB_KEYS)}")
        if flag is True:
            if not isinstance(value, bool):
                raise UserError(f"job key {key!r} must be true or false, got {json.dumps(value)}")
            argv += [f"--{key}"] if value else []
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv += [flag, str(value)]
        else:
            raise UserError(f"job key {key!r} has the value {json.dumps(value)}; give a string or a number")
    return argv


class Results:
    """The results file: one JSON line per job outcome, appended and flushed to disk at once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write the results file {str(self.path)!r} ({e.strerror or e}); choose "
                            "another --results") from None

    def add(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def run_batch(lines: list[Line], results: Results, prepare: Callable[[dict], tuple], render: Callable) -> dict:
    """Run every job: `prepare(job_line)` -> (job, saved state or DONE or None), before any model is
    loaded; `render(job, saved, desc)` -> the finished Render. Returns the counts by status."""
    from liveavatar.render import DONE

    counts = {"ok": 0, "error": 0, "skipped": 0}
    seen: dict[str, int] = {}
    t_batch = time.time()
    for k, line in enumerate(lines, 1):
        head = f"job {k}/{len(lines)} (line {line.number})"
        record = {"job": k, "line": line.number, "save_file": (line.job or {}).get("save_file")}
        t0 = time.time()
        try:
            if line.problem:
                raise UserError(line.problem)
            target = os.path.abspath(str(line.job.get("save_file", "")))
            if target in seen:
                raise UserError(f"save_file {line.job['save_file']!r} is also the output of job {seen[target]}; "
                                "give each job its own save_file")
            seen[target] = k
            job, saved = prepare(line.job)
            if saved == DONE:
                record.update(status="skipped", reason="already done")
                print(f"{head}: skipped, {job.save_file!r} is already done", file=sys.stderr)
            else:
                print(f"{head}: {'resuming at block ' + str(saved.block) if saved else 'rendering'} "
                      f"-> {job.save_file}", file=sys.stderr, flush=True)
                r = render(job, saved, head)
                record.update(status="ok", output=str(r.path), frames=r.frames, resumed_from_block=r.resumed_from,
                              blocks_rendered=r.blocks, checkpoints=r.checkpoints.count,
                              seconds=round(time.time() - t0, 2))
        except Exception as exc:  # a bad job fails alone: its one line goes to the results, the batch goes on
            record.update(status="error", message=one_line(exc))
            print(f"error: {head}: {record['message']}", file=sys.stderr)
        counts[record["status"]] += 1
        results.add(record)
        print(f"batch: {k}/{len(lines)} done ({counts['ok']} ok, {counts['error']} errors, {counts['skipped']} "
              f"skipped) after {time.time() - t_batch:.1f}s", file=sys.stderr, flush=True)
    return counts


__all__ = ["JOB_KEYS", "Line", "Results", "job_argv", "read_jobs", "run_batch"]
