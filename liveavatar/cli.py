"""The `liveavatar` command line: one `_cmd_<name>(args) -> int` per subcommand, registered in
`build_parser()`; `main` turns a `UserError` into one `error: ...` line on stderr and its exit code.

Subcommands: `generate` (stream a talking video to an MP4; accepts the official
`s2v_streaming_interact.py` flags), `check-ckpt` (verify a checkpoint folder and LoRA from file
headers, no weights read) and `inspect` (tensors, parameters and sizes of a preset's models). The
commands only parse flags, call the engine and print; they hold no model logic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Sequence

from liveavatar.config import PRESETS
from liveavatar.errors import Terminated, UserError

MAX_SEED = 2**63 - 1  # --base_seed; the seed of clip r is (seed + r) mod 2^63
MAX_GPUS = 1024  # `plan --gpus`


def _cmd_check_ckpt(args: argparse.Namespace) -> int:
    from liveavatar.io.verify import verify_checkpoint

    report = verify_checkpoint(args.ckpt_dir, lora_path=args.lora_path, only=args.only, preset=args.preset)
    print(report.summary(max_problems=None if args.all_problems else 20))
    return 0 if report.ok else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    from liveavatar.io.verify import format_bytes, inspect_preset

    stats = inspect_preset(args.preset)
    if args.json:
        print(json.dumps({"preset": args.preset, "components": [s.to_json() for s in stats]}, indent=2))
        return 0
    import torch

    print(f"preset {args.preset}: tensors, parameters and sizes of the models built on meta")
    print(f"{'component':<24} {'tensors':>8} {'params':>16} {'file dtype':>11} {'file size':>10} "
          f"{'bf16':>10} {'fp32':>10}")
    for s in stats:
        label = s.name if "." not in s.name else "  " + s.name.split(".", 1)[1]
        dtype = str(s.file_dtype).removeprefix("torch.")
        print(f"{label:<24} {s.tensors:>8} {s.params:>16,} {dtype:>11} {format_bytes(s.file_bytes):>10} "
              f"{format_bytes(s.bytes_as(torch.bfloat16)):>10} {format_bytes(s.bytes_as(torch.float32)):>10}")
    return 0


WEIGHTS_HELP = (
    "get the weights with `huggingface-cli download Wan-AI/Wan2.2-S2V-14B --local-dir ckpt/Wan2.2-S2V-14B` and "
    "`huggingface-cli download Quark-Vision/Live-Avatar --local-dir ckpt/LiveAvatar`, then pass "
    "--ckpt_dir ckpt/Wan2.2-S2V-14B --lora_path_dmd ckpt/LiveAvatar/liveavatar.safetensors; "
    "or run the built-in tiny model with --preset tiny"
)
DEFAULT_PROMPT = ("A person is talking to the camera with natural expressions and gestures, "
                  "in a bright room, realistic, high quality.")


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _refuse_unsupported(args: argparse.Namespace) -> None:
    """Official flags whose features are not available (yet): refused with a clear message."""
    if args.sample_solver != "euler":
        raise UserError(f"--sample_solver {args.sample_solver} is not supported; the distilled model samples "
                        "with --sample_solver euler")
    if args.sample_guide_scale not in (None, 0, 0.0):
        raise UserError(f"--sample_guide_scale {args.sample_guide_scale}: the distilled model runs without "
                        "guidance; pass --sample_guide_scale 0")
    if args.t5_fsdp:
        raise UserError("--t5_fsdp is not supported: the text encoder runs once, on rank 0 (or with --t5_cpu); "
                        "drop the flag")
    from liveavatar.distributed.launch import in_torchrun

    multi = {"--num_gpus_dit": args.num_gpus_dit not in (None, 1), "--enable_vae_parallel": args.enable_vae_parallel,
             "--ulysses_size": args.ulysses_size not in (None, 1), "--dit_fsdp": args.dit_fsdp}
    for flag, on in multi.items():
        if on and not in_torchrun():
            raise UserError(f"{flag} needs several processes: start the command with torchrun, e.g. `torchrun "
                            "--nproc_per_node 5 -m liveavatar generate ... --num_gpus_dit 4 --enable_vae_parallel`")
    if args.pose_video:
        raise UserError("--pose_video is not supported (Live Avatar always runs without pose); drop the flag")
    if args.audio and "+" in args.audio and not os.path.exists(args.audio):
        raise UserError("multi-speaker audio (a.wav+b.wav) is not supported; pass one audio file")


def _default_save_file(args: argparse.Namespace) -> str:
    import time

    stem = "_".join(args.prompt.split())[:50].replace("/", "_")
    return os.path.join("output", f"{time.strftime('%Y%m%d_%H%M%S')}_{args.sample_steps}step_{stem}.mp4")


def _check_fits(args, preset, runtime, device: str, height: int, width: int, infer_frames: int,
                steps: int):
    """Refuse, before any weight is loaded, a configuration the planner says will not fit the GPU
    (on CUDA, or anywhere when --gpu_memory is given). Caps the CUDA allocator at --gpu_memory.
    Returns (the plan's table or None, the runtime with --kv_sink auto decided: per_ring where it
    fits or nothing is planned, else shared where that fits)."""
    import torch

    from liveavatar.runtime.gpus import default_gpu, from_device
    from liveavatar.runtime.memory import GiB, format_plan, plan, predict

    total = None
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if args.gpu_memory is None and total is None:
        return None, runtime
    cap = args.gpu_memory * GiB if args.gpu_memory else total
    if total is not None and args.gpu_memory:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.device(device))
    gpu = (from_device(torch.device(device)) if total is not None else default_gpu(cap / GiB)).with_memory(cap / GiB)
    p = predict(preset, runtime, gpu, height, width, infer_frames, steps)  # --kv_sink auto: decided here
    if p.config != runtime:
        print(p.note, file=sys.stderr)
    table = format_plan(p, gpu)
    if not p.fits:
        print(table, file=sys.stderr)
        best = plan(preset, gpu, height, width, infer_frames, steps)
        fix = ("use: " + " ".join(best.config.flags())) if best.fits else (best.note or "use a smaller --size")
        raise UserError(f"this configuration needs {p.gpus[0].peak_bytes / GiB:.1f} GiB but the GPU budget is "
                        f"{p.budget_bytes / GiB:.1f} GiB (table above); {fix}")
    return table, p.config


def _on_sigterm(signum, frame):
    from liveavatar.render import STOP

    if STOP.request():  # a render with checkpoints is making blocks: it stops after this one, saved
        # os.write, not print: the signal may have interrupted a write to stderr (print would be reentrant)
        os.write(2, b"\nSIGTERM: stopping after this block, with a checkpoint (send SIGTERM again to stop at once)\n")
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup that follows must not be cut short
    raise Terminated()


def _in_range(flag: str, value, lo, hi, what: str = "") -> None:
    ok = value is not None and math.isfinite(value) and lo <= value <= hi
    if not ok:
        raise UserError(f"{flag} {value} is out of range: it must be between {lo} and {hi}{what}")


def _check_generate_flags(args: argparse.Namespace, preset) -> None:
    """Range checks of every numeric flag, before anything is built (the ranges are in the messages)."""
    from liveavatar.engine.session import MAX_SAMPLE_STEPS

    if args.base_seed != -1:
        _in_range("--base_seed", args.base_seed, 0, MAX_SEED, " (or -1 for a random seed)")
    _in_range("--sample_steps", args.sample_steps, 1, MAX_SAMPLE_STEPS, " (the distilled model uses 4)")
    if args.gpu_memory is not None:
        _in_range("--gpu_memory", args.gpu_memory, 0.5, 100_000, " GiB")
    if args.resident_blocks is not None:
        _in_range("--resident_blocks", args.resident_blocks, 0, preset.dit.num_layers,
                  f" (the DiT has {preset.dit.num_layers} blocks)")
    if args.kv_on_device is not None:
        _in_range("--kv_on_device", args.kv_on_device, 0, args.sample_steps, " (one cache per denoising step)")
    if args.num_clip is not None:
        _in_range("--num_clip", args.num_clip, 1, 10**9, " (or omit it to follow the audio)")
    _in_range("--infer_frames", args.infer_frames, 12, 4800, " and a multiple of 12; use 48")
    _in_range("--audio_offset_frames", args.audio_offset_frames, 0, 3)
    _check_device(args.device)
    _check_attention(args.attention, args.device)


def _check_attention(name: str, device: str | None) -> None:
    """--attention must name a kernel that runs on the device (checked before any weight is loaded)."""
    if name == "auto":
        return
    import torch

    from liveavatar.runtime.attention import attention_backends

    attention_backends(name, device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _check_device(device: str | None) -> None:
    """`device` must name a device this torch build has."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise UserError(f"--device {device!r}: this engine runs on cpu or cuda; use one of them")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device!r}: this torch build sees no CUDA GPU; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    from liveavatar.config import get_preset
    from liveavatar.render import DONE, locate

    start = time.time()
    _refuse_unsupported(args)
    preset = get_preset(args.preset)
    if preset.name != "tiny" and not args.ckpt_dir:
        raise UserError(f"no model weights given (--ckpt_dir); {WEIGHTS_HELP}")
    _check_generate_flags(args, preset)
    from liveavatar.distributed.launch import in_torchrun

    if in_torchrun():
        if args.resume:
            raise UserError("--resume is for single-process runs; a torchrun generation cannot be resumed: "
                            "run it again without --resume")
        from liveavatar.distributed.generate import generate
        from liveavatar.io.output import OutputFile

        opts, image, audio, save_file = _options_from_args(args)

        def make_output():
            return OutputFile(save_file, what="output video", overwrite=args.overwrite, inputs=(image, audio),
                              rename_if_taken=args.save_file is None)

        _in_range("--dist_timeout", args.dist_timeout, 1, 86_400, " seconds")
        signal.signal(signal.SIGTERM, _on_sigterm)
        return generate(args, preset, opts, image, audio, make_output, _runtime_from_args(args), start)
    job = _job_from_args(args, preset)  # every input is checked before any weight is loaded
    saved = locate(job, args.resume)
    if saved == DONE:
        print(f"nothing to resume: {job.save_file!r} is this job's finished video")
        return 0
    job.output()  # the output rules (an existing file, an unwritable folder) before any weight is loaded
    for line in job.inputs.warnings():
        print(f"warning: {line}", file=sys.stderr)
    if saved is None:
        _mention_resumable(job)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return _generate(args, preset, job, saved, start)


def _options_from_args(args: argparse.Namespace):
    """(GenerationOptions, image, audio, save_file) of a `generate` command line (the seed drawn when -1)."""
    import random

    from liveavatar.engine.session import GenerationOptions
    from liveavatar.io import media

    seed = args.base_seed if args.base_seed >= 0 else random.randint(0, 2**31 - 1)
    opts = GenerationOptions(
        size=media.parse_size(args.size), infer_frames=args.infer_frames, num_clip=args.num_clip, seed=seed,
        sample_steps=args.sample_steps, online_decode=not args.offline_decode,
        audio_offset_frames=args.audio_offset_frames, audio_encoding=args.audio_encoding,
        audio_window=_audio_window(args.audio_window),
    )
    image = args.image or str(media.example_image_path())
    audio = args.audio or str(media.example_audio_path())
    save_file = _default_save_file(args) if args.save_file is None else args.save_file
    return opts, image, audio, save_file


def _checkpoint_every(args: argparse.Namespace) -> int | None:
    """--checkpoint_every: N blocks, 0 (never) or auto (None)."""
    spec = str(args.checkpoint_every).strip().lower()
    if spec == "auto":
        every = None
    else:
        try:
            every = int(spec)
        except ValueError:
            raise UserError(f"--checkpoint_every {args.checkpoint_every!r} is not a number of blocks or auto") from None
        _in_range("--checkpoint_every", every, 0, 10**9, " blocks (0: never, or auto)")
    if args.offline_decode:
        if args.resume:
            raise UserError("--resume needs blocks decoded as they finish: drop --offline_decode")
        return 0  # a state exists only between decoded blocks
    return every


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _model_identity(args: argparse.Namespace, preset) -> dict:
    """What identifies the model a video is made with (checked when a render is resumed)."""
    from liveavatar.engine.resume import weights_fingerprint

    if args.ckpt_dir is None:
        weights = "built-in tiny weights (seed 0)"
    else:
        weights = weights_fingerprint([p for p in (args.ckpt_dir, args.lora_path_dmd) if p])
    kv_fp8 = bool(args.kv_fp8)
    return {"preset": preset.name, "dtype": preset.dtype, "weights": weights, "fp8": bool(args.fp8),
            "kv_fp8": kv_fp8, "kv_on_device": args.kv_on_device if kv_fp8 else None,
            "device": _device(args).split(":")[0]}


def _job_from_args(args: argparse.Namespace, preset):
    """A checked `Job` from a `generate` command line: flags, inputs and their hashes, the model's identity."""
    from liveavatar.engine.resume import JobIdentity
    from liveavatar.engine.session import Inputs
    from liveavatar.render import Job

    every = _checkpoint_every(args)
    opts, image, audio, save_file = _options_from_args(args)
    from liveavatar.io.output import OutputFile

    OutputFile(save_file, what="output video", overwrite=True, inputs=(image, audio))  # path checks only
    inputs = Inputs.load(image, audio, opts)
    identity = JobIdentity.make(opts, args.prompt, image, audio, _model_identity(args, preset),
                                any_seed=args.base_seed < 0)
    return Job(image, audio, args.prompt, opts, inputs, save_file, identity, overwrite=args.overwrite,
               rename_if_taken=args.save_file is None, checkpoint_every=every, dump_dir=args.dump_chunks)


def _mention_resumable(job) -> None:
    from liveavatar.engine.resume import read_state, states_beside

    for path in states_beside(job.save_file):
        try:
            st = read_state(path)
        except UserError:
            continue
        if st.partial.exists():
            print(f"warning: {str(st.partial)!r} can be continued from block {st.block} with --resume; this run "
                  "starts anew and keeps it", file=sys.stderr)


def _load_pipeline(args: argparse.Namespace, preset, device: str, runtime):
    import torch

    from liveavatar.engine.pipeline import Pipeline

    if args.ckpt_dir is None:  # the built-in tiny model (the real one needs --ckpt_dir, checked above)
        pipe = Pipeline.tiny(device=device, runtime=runtime)
    else:
        pipe = Pipeline.from_checkpoint(args.ckpt_dir, args.lora_path_dmd, preset, device=device,
                                        dtype=getattr(torch, preset.dtype), runtime=runtime)
    if getattr(args, "compile", False):
        from liveavatar.runtime.compile import apply_compile

        apply_compile(pipe.dit)
    return pipe


def _generate(args, preset, job, saved, start: float) -> int:
    """Load the model, render the job into its MP4; interruptions keep the partial file and its state."""
    import time

    import torch

    from liveavatar.render import Render

    device = _device(args)
    table, runtime = _check_fits(args, preset, _runtime_from_args(args), device, job.inputs.height,
                                 job.inputs.width, job.opts.infer_frames, job.opts.sample_steps)
    t0 = time.time()
    render = None
    try:
        pipe = _load_pipeline(args, preset, device, runtime)
        render = Render(pipe, job, saved)
        path = render.run()
    except (KeyboardInterrupt, Terminated) as stop:
        code, name = (130, "Ctrl-C") if isinstance(stop, KeyboardInterrupt) else (143, "SIGTERM")
        partial = render.partial_path if render is not None else None
        kept = (f"the partial video {str(partial)!r} plays its {render.frames} frames" if partial
                else "nothing was written")
        if partial and render.stopped_with_checkpoint:
            kept += "; run the same command with --resume to continue it"
        print(f"error: stopped by {name}; {kept}", file=sys.stderr)
        return code
    except torch.OutOfMemoryError:
        if table:
            print(table, file=sys.stderr)
        raise UserError("the GPU ran out of memory; the table above is the plan for this configuration: "
                        "run `liveavatar plan --auto` with your GPU memory and use the flags it prints") from None
    frames = render.frames
    first = "-" if render.first_frame is None else f"{render.first_frame:.1f}s"
    print(f"saved {path} ({frames} frames, {frames / preset.fps:.2f}s) in {time.time() - t0:.1f}s "
          f"(first frame after {first}); {render.checkpoints.summary()}")
    return 0


class _JobParser(argparse.ArgumentParser):
    """The `generate` flags of one batch job: a bad one is that job's error, not the batch's."""

    def error(self, message: str):
        raise UserError(message)


def _cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from liveavatar import batch
    from liveavatar.config import get_preset
    from liveavatar.render import Render, locate

    preset = get_preset(args.preset)
    if preset.name != "tiny" and not args.ckpt_dir:
        raise UserError(f"no model weights given (--ckpt_dir); {WEIGHTS_HELP}")
    _check_device(args.device)
    lines = batch.read_jobs(args.jobs)
    results = batch.Results(args.results or Path(args.jobs).with_suffix(".results.jsonl"))
    job_parser = _JobParser(prog="job", add_help=False)
    _add_generate(job_parser.add_subparsers(parser_class=_JobParser))
    model = {k: v for k, v in vars(args).items() if k not in ("jobs", "results", "checkpoint_every", "func")}
    device = _device(args)
    runtime = _runtime_from_args(args)
    pipe = None

    def prepare(line: dict):
        job_args = job_parser.parse_args(["generate", *batch.job_argv(line)])
        vars(job_args).update(model, checkpoint_every=line.get("checkpoint_every", args.checkpoint_every))
        _refuse_unsupported(job_args)
        _check_generate_flags(job_args, preset)
        job = _job_from_args(job_args, preset)
        saved = locate(job, resume=True)
        if saved != "done":
            job.output()  # an existing file that is not this job's video, an unwritable folder
        return job, saved

    def render(job, saved, desc):
        nonlocal pipe
        _, job_runtime = _check_fits(args, preset, runtime, device, job.inputs.height, job.inputs.width,
                                     job.opts.infer_frames, job.opts.sample_steps)
        if pipe is None:
            print(f"loading {preset.name} on {device}", file=sys.stderr, flush=True)
            pipe = _load_pipeline(args, preset, device, job_runtime)
        pipe.runtime = job_runtime  # --kv_sink auto may differ by size; it only shapes the session's caches
        r = Render(pipe, job, saved, desc=desc)
        r.run()
        return r

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        counts = batch.run_batch(lines, results, prepare, render)
    finally:
        results.close()
    print(f"batch: {counts['ok']} ok, {counts['error']} errors, {counts['skipped']} skipped; results in "
          f"{results.path}")
    return 1 if counts["error"] else 0


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="render every job of a JSONL file with one loaded model (killable, rerunnable)")
    p.add_argument("jobs", help="JSONL file: one JSON object a line with image, audio, save_file and any "
                               "per-video generate option (prompt, size, num_clip, base_seed, ...)")
    p.add_argument("--results", default=None,
                   help="JSONL file the outcome of each job is appended to (default: <jobs>.results.jsonl)")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS))
    p.add_argument("--ckpt_dir", default=None, help="the Wan2.2-S2V-14B folder")
    p.add_argument("--lora_path_dmd", "--lora_path", dest="lora_path_dmd", default=None)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--gpu_memory", type=float, default=None, help="GB of GPU memory to use")
    p.add_argument("--checkpoint_every", default="auto", help="as for generate (a job may set its own)")
    _add_runtime_flags(p)
    p.set_defaults(func=_cmd_batch)


def _audio_window(spec: str) -> tuple[float, float, float]:
    """--audio_window W,L,R (seconds) -> (window, left, right)."""
    try:
        parts = tuple(float(x) for x in spec.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise UserError(f"--audio_window {spec!r} is not three numbers WINDOW,LEFT,RIGHT in seconds (e.g. 1,5,1)")
    return parts


def _runtime_from_args(args: argparse.Namespace):
    from liveavatar.runtime.memory import RuntimeConfig

    kv = args.kv_on_device
    if getattr(args, "offload_kv_cache", False) and kv is None:
        kv = 0
    return RuntimeConfig(fp8=args.fp8, resident_blocks=args.resident_blocks, kv_on_device=kv,
                         kv_fp8=args.kv_fp8, t5_cpu=args.t5_cpu, offload_model=args.offload_model,
                         attention=args.attention, kv_sink=args.kv_sink)


def _gpus(args: argparse.Namespace) -> tuple[int, float | None]:
    """(count, GiB each) from --gpus N | NxGiB and --gpu_memory GiB."""
    spec = str(args.gpus)
    bad = UserError(f"--gpus {spec!r} is not of the form N or NxGiB with N >= 1 and GiB > 0 (e.g. 4x24)")
    n, _, gb = spec.partition("x")
    try:
        count, size = int(n), (float(gb) if gb else args.gpu_memory)
    except ValueError:
        raise bad from None
    if "x" in spec and not gb:
        raise bad
    _in_range("--gpus count", count, 1, MAX_GPUS)
    if size is not None:
        _in_range("--gpus memory" if gb else "--gpu_memory", size, 0.5, 100_000, " GiB")
    return count, size


def _aspect(spec: str) -> tuple[int, int]:
    """--aspect H:W -> (H, W), positive integers no further apart than 16:1."""
    h, _, w = spec.partition(":")
    try:
        ah, aw = int(h), int(w)
    except ValueError:
        ah = aw = 0
    if ah <= 0 or aw <= 0 or max(ah / aw, aw / ah) > 16:
        raise UserError(f"--aspect {spec!r} is not H:W with positive integers at most 16:1 apart (e.g. 16:9)")
    return ah, aw


def _plan_gpu(args: argparse.Namespace, gib: float | None):
    """The GPU `plan` plans for: --gpu NAME (its memory unless --gpu_memory / NxGiB says otherwise), else
    this machine's CUDA device, else the default rates for the given memory; rate flags override."""
    import dataclasses

    from liveavatar.runtime.gpus import GPU_NAMES, default_gpu, from_device, gpu_named

    if args.gpu is not None:
        try:
            gpu = gpu_named(args.gpu, gib)
        except KeyError:
            raise UserError(f"--gpu {args.gpu!r} is not a GPU this planner knows; use one of "
                            f"{', '.join(GPU_NAMES)}, or give --gpu_memory GIB (and --tflops, --mem_gbps)") from None
    elif gib is not None:
        gpu = default_gpu(gib)
    else:
        import torch

        if not torch.cuda.is_available():
            raise UserError("give the GPU memory in GiB (--gpu_memory 24 or --gpus 1x24) or the GPU by name "
                            "(--gpu rtx4090)")
        gpu = from_device()
    for flag, value in (("--tflops", args.tflops), ("--link_gbps", args.link_gbps), ("--peer_gbps", args.peer_gbps),
                        ("--mem_gbps", args.mem_gbps)):
        if value is not None:
            _in_range(flag, value, 0.001, 1e7)
    if args.tflops:  # the FP8 rate keeps its ratio to the bf16 rate
        fp8 = None if gpu.fp8_tflops is None else gpu.fp8_tflops * args.tflops / gpu.tflops
        gpu = dataclasses.replace(gpu, tflops=args.tflops, fp8_tflops=fp8)
    return dataclasses.replace(gpu, link_gbps=args.link_gbps or gpu.link_gbps, mem_gbps=args.mem_gbps or gpu.mem_gbps,
                               peer_gbps=args.peer_gbps or gpu.peer_gbps)


def _cmd_plan(args: argparse.Namespace) -> int:
    from liveavatar.config import get_preset
    from liveavatar.io import media
    from liveavatar.runtime.memory import GiB, format_plan, plan, predict

    preset = get_preset(args.preset)
    n_gpus, gb = _gpus(args)
    if args.infer_frames <= 0 or args.infer_frames % 12:
        raise UserError(f"--infer_frames {args.infer_frames} is not a positive multiple of 12; use 48")
    _in_range("--nnodes", args.nnodes, 1, MAX_GPUS)
    if args.resident_blocks is not None:
        _in_range("--resident_blocks", args.resident_blocks, 0, preset.dit.num_layers)
    if args.kv_on_device is not None:
        _in_range("--kv_on_device", args.kv_on_device, 0, preset.sampler.steps)
    ah, aw = _aspect(args.aspect)
    height, width = media.target_size(ah * 80, aw * 80, media.parse_size(args.size))
    gpu = _plan_gpu(args, gb)
    gb = gpu.memory_bytes / GiB
    total = n_gpus * args.nnodes
    if total > 1:
        return _plan_parallel(args, preset, gpu, total, height, width)
    if args.auto:
        p = plan(preset, gpu, height, width, args.infer_frames, allow_fp8=not args.no_fp8)
    else:
        p = predict(preset, _runtime_from_args(args), gpu, height, width, args.infer_frames)
    if args.json:
        print(json.dumps(p.to_json() | {"gpu": _gpu_json(gpu)}, indent=2))
    else:
        print(format_plan(p, gpu))
        if p.fits:
            cap = f" --gpu_memory {gb:g}" if (args.gpu_memory or "x" in str(args.gpus)) else ""
            print("run: liveavatar generate " + " ".join(p.config.flags()) + f" --size {args.size}{cap}")
        elif not args.auto:
            best = plan(preset, gpu, height, width, args.infer_frames)
            if best.fits:
                print("what fits: liveavatar generate " + " ".join(best.config.flags()) + f" --size {args.size}")
            else:
                print(best.note or f"nothing fits in {gb:g} GiB; try a smaller --size")
    return 0 if p.fits else 1


def _plan_parallel(args, preset, gpu, total: int, height: int, width: int) -> int:
    """`plan` for several GPUs: the given layout (--num_gpus_dit ...) or, with --auto, the fastest."""
    from liveavatar.distributed.layout import ParallelLayout
    from liveavatar.distributed.plan import format_parallel, plan_parallel, predict_parallel

    if args.auto:
        p = plan_parallel(preset, gpu, total, height, width, args.infer_frames, args.nnodes, allow_fp8=not args.no_fp8)
    else:
        decode = bool(args.enable_vae_parallel)
        denoise = args.num_gpus_dit if args.num_gpus_dit is not None else total - int(decode)
        layout = ParallelLayout(denoise, args.ulysses_size or 1, args.dit_fsdp, decode, preset.sampler.steps)
        layout.check(preset.dit.num_heads, total)
        if args.nnodes > 1 and (total // args.nnodes) % layout.ulysses:
            raise UserError(f"{total} GPUs on {args.nnodes} nodes: each node needs the same number of GPUs and a "
                            "whole sequence-parallel group (--ulysses_size at most the GPUs of a node)")
        p = predict_parallel(preset, _runtime_from_args(args), layout, gpu, height, width, args.infer_frames,
                             args.nnodes)
    if args.json:
        print(json.dumps(p.to_json() | {"gpu": _gpu_json(gpu)}, indent=2))
    else:
        print(format_parallel(p, gpu, args.size))
        if not p.fits and not args.auto:
            best = plan_parallel(preset, gpu, total, height, width, args.infer_frames, args.nnodes)
            print(("what fits: " + best.command(args.size)) if best.fits else best.note)
    return 0 if p.fits else 1


def _gpu_json(gpu) -> dict:
    import dataclasses

    return dataclasses.asdict(gpu) | {"has_fp8": gpu.has_fp8}


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fp8", action="store_true", help="DiT Linear weights in FP8 e4m3 (after the LoRA merge)")
    p.add_argument("--resident_blocks", type=int, default=None,
                   help="keep K transformer blocks on the GPU and stream the rest from host memory")
    p.add_argument("--kv_on_device", type=int, default=None,
                   help="denoising-step KV caches kept on the GPU (the rest in host memory, staged per layer)")
    p.add_argument("--kv_fp8", action="store_true", help="store the KV caches kept on the GPU in FP8 e4m3")
    p.add_argument("--kv_sink", default="auto", choices=["auto", "per_ring", "shared"],
                   help="the sink tokens of the KV caches kept on the GPU (bf16): per_ring (a copy after each "
                        "cache, attended in place), shared (stored once; each layer's cache and the sink copied "
                        "into one staging buffer per forward: 2.16 GB less a cache at 704x384, a little slower), "
                        "auto (the memory planner's choice where the GPU is known, else per_ring)")
    p.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    p.add_argument("--offload_model", type=_str2bool, nargs="?", const=True, default=True,
                   help="keep the text and audio encoders in host memory between uses (default true)")
    p.add_argument("--attention", default="auto", choices=["auto", "cudnn", "flash", "efficient", "math"],
                   help="attention kernel: auto (on CUDA the fastest that runs: cuDNN first on Hopper, flash "
                        "elsewhere; on the CPU PyTorch's choice) or one of them (an error if it does not run here)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict per-GPU memory for a configuration, or pick one that fits (--auto)")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS))
    p.add_argument("--gpu", default=None, type=str.lower,
                   help="plan for this GPU: its memory, compute capability and data-sheet rates (h100-sxm, h200, "
                        "a100-80gb, l40s, rtx4090, ...; an unknown name lists them all); default: this machine's GPU")
    p.add_argument("--gpus", default="1", help="GPUs per node: N, or NxGiB (e.g. 5x24)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes with --gpus GPUs each (default 1)")
    p.add_argument("--peer_gbps", type=float, default=None, help="GPU-to-GPU GB/s inside a node for the estimate")
    p.add_argument("--num_gpus_dit", type=int, default=None, help="a layout to predict: denoising GPUs")
    p.add_argument("--enable_vae_parallel", action="store_true", help="a layout to predict: a decode GPU")
    p.add_argument("--ulysses_size", type=int, default=None, help="a layout to predict: GPUs per denoise stage")
    p.add_argument("--dit_fsdp", action="store_true", help="a layout to predict: sharded DiT weights")
    p.add_argument("--gpu_memory", type=float, default=None,
                   help="GiB (2^30 bytes) of memory per GPU (default: the --gpu's memory)")
    p.add_argument("--size", default="704*384", help="area cap H*W (default 704*384)")
    p.add_argument("--aspect", default="16:9", help="image aspect H:W (default 16:9, a portrait)")
    p.add_argument("--infer_frames", type=int, default=48)
    p.add_argument("--auto", action="store_true", help="pick the fastest configuration that fits")
    p.add_argument("--no_fp8", action="store_true", help="with --auto: keep bf16 weights and KV caches (no FP8)")
    p.add_argument("--tflops", type=float, default=None,
                   help="dense bf16 TFLOP/s for the speed estimate (the FP8 rate keeps its ratio to it)")
    p.add_argument("--mem_gbps", type=float, default=None, help="GPU memory GB/s for the speed estimate")
    p.add_argument("--link_gbps", type=float, default=None, help="host-to-GPU GB/s for the speed estimate")
    p.add_argument("--json", action="store_true")
    _add_runtime_flags(p)
    p.set_defaults(func=_cmd_plan)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a talking-avatar video from an image, speech and a prompt",
                       description="Generate a talking video. Flags follow the official s2v_streaming_interact.py.")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS),
                   help="s2v-14b (real weights, needs --ckpt_dir) or tiny (the built-in random model, a CPU "
                        "demo; with --ckpt_dir, a checkpoint of tiny size)")
    p.add_argument("--ckpt_dir", default=None, help="the Wan2.2-S2V-14B folder")
    p.add_argument("--lora_path_dmd", "--lora_path", dest="lora_path_dmd", default=None,
                   help="Live Avatar LoRA (liveavatar.safetensors or the folder holding it)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--image", default=None, help="reference image (default: the bundled example face)")
    p.add_argument("--audio", default=None, help="speech: WAV/FLAC/OGG/MP3/M4A (default: the bundled example)")
    p.add_argument("--size", default="704*384", help="area cap H*W; the image aspect is kept (default 704*384)")
    p.add_argument("--num_clip", type=int, default=None, help="at most this many clips of --infer_frames frames "
                   "(default: as many as the audio needs; the official scripts' 10000 means the whole audio)")
    p.add_argument("--infer_frames", type=int, default=48, help="frames per clip, a multiple of 12 (default 48)")
    p.add_argument("--sample_steps", type=int, default=4)
    p.add_argument("--sample_guide_scale", type=float, default=0.0)
    p.add_argument("--sample_solver", default="euler")
    p.add_argument("--sample_shift", type=float, default=None, help="accepted; the schedule uses shift 3")
    p.add_argument("--base_seed", type=int, default=42, help="seed (-1: random); a seed reproduces a video")
    p.add_argument("--save_file", default=None, help="output MP4 (default: output/<time>_<prompt>.mp4); an existing "
                   "file is kept unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --save_file once the new video is complete")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--resume", action="store_true",
                   help="continue the killed run of this --save_file from its last checkpoint (same arguments and "
                        "inputs; starts anew when there is none; docs/resume.md)")
    p.add_argument("--checkpoint_every", default="auto",
                   help="save the render's state beside the partial video every N blocks; 0: never; auto "
                        "(default): as often as keeps the saving time under 2 %% of the run")
    p.add_argument("--dump_chunks", default=None, metavar="DIR",
                   help="also write each chunk's raw frames and audio (before encoding) to DIR/chunk-<block>.npz")
    _add_runtime_flags(p)
    _add_compile_flag(p)
    p.add_argument("--gpu_memory", type=float, default=None,
                   help="GiB (2^30 bytes) of GPU memory to use (caps the allocator; default: the whole GPU)")
    p.add_argument("--offload_kv_cache", action="store_true", help="keep every KV cache in host memory "
                   "(same as --kv_on_device 0)")
    p.add_argument("--enable_online_decode", action="store_true",
                   help="accepted: blocks are always decoded as they finish unless --offline_decode")
    p.add_argument("--offline_decode", action="store_true", help="decode all latents at the end (same frames)")
    p.add_argument("--audio_offset_frames", type=int, default=3,
                   help="frames into the speech where the muxed audio starts: 3 keeps frames and audio in "
                        "sync (default); 0 muxes like the official scripts")
    p.add_argument("--audio_encoding", default="auto", choices=["auto", "one-pass", "windowed"],
                   help="wav2vec2 encoding of the speech: one-pass (official; whole speech first), windowed "
                        "(streaming, flat memory), or auto (one-pass up to 60 s, windowed beyond; default)")
    p.add_argument("--audio_window", default="1,5,1",
                   help="windowed encoding: window, left context and look-ahead in seconds (default 1,5,1)")
    p.add_argument("--convert_model_dtype", action="store_true", help="accepted; weights load in bf16")
    p.add_argument("--load_lora", action="store_true", help="accepted; the LoRA is merged when a path is given")
    p.add_argument("--training_config", default=None, help="accepted; LoRA rank 128 / alpha 64 are built in")
    p.add_argument("--task", default="s2v-14B", choices=["s2v-14B"])
    p.add_argument("--single_gpu", action="store_true", help="accepted")
    # Multi-GPU: under torchrun (every rank runs the same command).
    p.add_argument("--num_gpus_dit", type=int, default=None,
                   help="ranks that denoise (default: all but the decode rank); the rest decode")
    p.add_argument("--enable_vae_parallel", action="store_true", help="decode on a rank of its own (the last one)")
    p.add_argument("--ulysses_size", type=int, default=None,
                   help="ranks per denoise stage that split its tokens (sequence parallel; divides the heads)")
    p.add_argument("--dit_fsdp", action="store_true",
                   help="shard the DiT blocks' weights across each sequence-parallel group")
    p.add_argument("--dist_timeout", type=float, default=600.0,
                   help="seconds any rank waits for another before giving up (default 600)")
    p.add_argument("--t5_fsdp", action="store_true", help="not supported (refused)")
    p.add_argument("--pose_video", default=None)
    p.set_defaults(func=_cmd_generate)


class _Parser(argparse.ArgumentParser):
    """Command-line errors as one line (`error: ...`), exit code 2, like every other bad input."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    from liveavatar.config import get_preset
    from liveavatar.io import media

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("the server needs FastAPI and uvicorn: pip install 'liveavatar[server]'") from None
    preset = get_preset(args.preset)
    if preset.name != "tiny" and not args.ckpt_dir:
        raise UserError(f"no model weights given (--ckpt_dir); {WEIGHTS_HELP}")
    token = args.token or os.environ.get("LIVEAVATAR_TOKEN") or None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and token is None:
        raise UserError(f"--host {args.host} is reachable from other machines: give a token (--token or "
                        "LIVEAVATAR_TOKEN) that every client must send, or serve on 127.0.0.1")
    _in_range("--port", args.port, 1, 65535)
    if args.max_active != "auto":
        try:
            args.max_active = int(args.max_active)
        except ValueError:
            raise UserError(f"--max_active {args.max_active!r} is not a number; give 1 ... 64 or auto") from None
        _in_range("--max_active", args.max_active, 1, 64)
    _in_range("--max_lead", args.max_lead, 0.1, 86400)
    max_area = media.parse_size(args.size)
    _in_range("--max_seconds", args.max_seconds, 1, 7 * 86400)
    _in_range("--idle_timeout", args.idle_timeout, 1, 86400)
    _check_device(args.device)
    _check_attention(args.attention, args.device)

    from liveavatar.serve.app import serve
    from liveavatar.serve.engine import Limits, LiveEngine, auto_max_active

    pipe = _load_pipeline(args, preset, _device(args), _runtime_from_args(args))
    height, width = media.target_size(384, 704, max_area)
    if args.max_active == "auto":
        args.max_active, why = auto_max_active(pipe, height, width)
    else:
        why = f"{args.max_active} sessions (--max_active)"
    limits = Limits(max_active=args.max_active, max_seconds=args.max_seconds, idle_timeout=args.idle_timeout,
                    max_lead=args.max_lead, max_area=max_area)
    compiled = "; transformer blocks compiled (a size's first block waits for it)" if args.compile else ""
    print(f"serving {preset.name} on http://{args.host}:{args.port}/; at once: {why}{compiled}", file=sys.stderr,
          flush=True)
    serve(LiveEngine(pipe, limits), args.host, args.port, token)
    return 0


def _add_compile_flag(p: argparse.ArgumentParser, per_size: bool = False) -> None:
    extra = " Each video size compiles once, when a session first uses it." if per_size else ""
    p.add_argument("--compile", action="store_true",
                   help="compile each transformer block with torch.compile (fullgraph; off by default: not yet "
                        "measured faster on a GPU, and compiling takes minutes on a CPU)." + extra)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a live avatar server: speech in over WebSocket or HTTP, video out as it is made")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS))
    p.add_argument("--ckpt_dir", default=None, help="the Wan2.2-S2V-14B folder")
    p.add_argument("--lora_path_dmd", "--lora_path", dest="lora_path_dmd", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="a secret every request must carry (required off loopback)")
    p.add_argument("--max_active", default="auto",
                   help="sessions generating at once, others wait in a queue (default auto: as many as the memory "
                        "planner fits at --size, at most 8)")
    p.add_argument("--size", default="704*384",
                   help="largest video area a session may ask for (and the default); sessions plan at this size")
    p.add_argument("--max_seconds", type=float, default=3600.0, help="seconds of video a session may make")
    p.add_argument("--max_lead", type=float, default=1.0,
                   help="seconds of video a session may run ahead of real time (large: as fast as possible)")
    p.add_argument("--idle_timeout", type=float, default=300.0,
                   help="seconds without a client message before a session is closed")
    _add_runtime_flags(p)
    _add_compile_flag(p, per_size=True)
    p.set_defaults(func=_cmd_serve)


def _cmd_ui(args: argparse.Namespace) -> int:
    from liveavatar.config import get_preset

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the app needs Gradio: pip install 'liveavatar[ui]'") from None
    preset = get_preset(args.preset)
    if preset.name != "tiny" and not args.ckpt_dir:
        raise UserError(f"no model weights given (--ckpt_dir); {WEIGHTS_HELP}")
    _in_range("--port", args.port, 1, 65535)
    _check_device(args.device)
    from liveavatar.serve.ui import launch

    launch(_load_pipeline(args, preset, _device(args), _runtime_from_args(args)), args.host, args.port, "s2v-14b")
    return 0


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="a Gradio app: image, speech or microphone, prompt; the video plays as it is made")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS))
    p.add_argument("--ckpt_dir", default=None, help="the Wan2.2-S2V-14B folder")
    p.add_argument("--lora_path_dmd", "--lora_path", dest="lora_path_dmd", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    _add_runtime_flags(p)
    _add_compile_flag(p, per_size=True)
    p.set_defaults(func=_cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="liveavatar", description="Live Avatar: streaming avatar video")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_generate(sub)
    _add_batch(sub)
    _add_plan(sub)
    _add_serve(sub)
    _add_ui(sub)

    p = sub.add_parser("check-ckpt", help="verify checkpoint files from their headers (no weights read)")
    p.add_argument("--ckpt_dir", required=True, help="the Wan2.2-S2V-14B folder")
    p.add_argument("--lora_path", default=None, help="Live Avatar LoRA (liveavatar.safetensors)")
    p.add_argument("--only", default=None, help="comma list of dit,lora,t5,vae,audio,tokenizer (default all)")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS))
    p.add_argument("--all_problems", action="store_true", help="list every problem (default: 20 a component)")
    p.set_defaults(func=_cmd_check_ckpt)

    p = sub.add_parser("inspect", help="tensors, parameters and bytes of a preset's models")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a command-line error already printed on one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # stdout piped into a reader that stopped early (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("error: stopped by Ctrl-C", file=sys.stderr)
        return 130
    except Terminated:
        print("error: stopped by SIGTERM", file=sys.stderr)
        return 143


if __name__ == "__main__":
    raise SystemExit(main())
