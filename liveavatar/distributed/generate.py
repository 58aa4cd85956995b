"""A generation on several ranks: one rank's program (`run_rank`), and `liveavatar generate` under
`torchrun` (`generate`).

The same command line runs on every rank; the parallel layout (`--num_gpus_dit`, `--ulysses_size`,
`--dit_fsdp`, `--enable_vae_parallel`) gives each its role. The single-process generation and this
one share everything but the scheduling: the frontend, the stages, the decoder and the MP4 writer.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from liveavatar.distributed import launch
from liveavatar.distributed.layout import ParallelLayout, Role
from liveavatar.distributed.pipeline import PipelineRank, RankStats
from liveavatar.engine.conditioning import Conditioning, encode_conditioning
from liveavatar.engine.session import Chunk, Inputs, make_frontend, speech_stream
from liveavatar.errors import UserError
from liveavatar.models.layout import SinkLayout


def layout_from_args(args, world: int, steps: int, num_heads: int) -> ParallelLayout:
    decode = bool(args.enable_vae_parallel)
    denoise = args.num_gpus_dit if args.num_gpus_dit is not None else world - int(decode)
    layout = ParallelLayout(denoise, args.ulysses_size or 1, bool(args.dit_fsdp), decode, steps)
    return layout.check(num_heads, world)


def role_parts(role: Role) -> tuple[str, ...]:
    """The models a role needs (the frontend encodes text, speech and the reference image)."""
    if role.frontend:
        return ("dit", "vae", "text", "audio")
    return (("dit",) if role.stage is not None else ()) + (("vae",) if role.decodes else ())


def split_dit(pipe, layout: ParallelLayout, role: Role, groups, device) -> None:
    """Sequence parallelism and sharded weights over the stage's group (the DiT built unplaced when
    sharded)."""
    if role.stage is None:
        return
    if layout.ulysses > 1:
        from liveavatar.distributed.ulysses import apply_ulysses

        apply_ulysses(pipe.dit, groups[role.stage])
    if layout.shard_weights:
        from liveavatar.distributed.sharding import apply_sharded_weights

        pipe.streamer = apply_sharded_weights(pipe.dit, groups[role.stage], device)


def share_conditioning(pipe, cond: Conditioning | None, height: int, width: int) -> Conditioning:
    """Rank 0's conditioning on every rank."""
    cfg, dev, dtype = pipe.preset.dit, pipe.device, pipe.dtype
    h, w = height // 8, width // 8
    text = launch.broadcast_tensor(None if cond is None else cond.text, (1, cfg.text_len, cfg.dim), dtype, dev)
    ref = launch.broadcast_tensor(None if cond is None else cond.ref_latent, (1, cfg.in_dim, 1, h, w), dtype, dev)
    motion = launch.broadcast_tensor(None if cond is None else cond.motion_latents,
                                     (1, cfg.in_dim, cfg.lat_motion_frames, h, w), dtype, dev)
    return Conditioning(text, ref, motion, cond.warnings if cond is not None else ())


@dataclass
class RankJob:
    """What one rank needs to take its part in a generation."""

    layout: ParallelLayout
    rank: int
    opts: object  # GenerationOptions
    image: str
    audio: object  # a speech file path, or 16 kHz samples
    prompt: str
    build_pipe: Callable  # (role, place_dit) -> Pipeline on this rank's device
    check_output: Callable | None = None  # the decoding rank's output check, before any model loads
    say: Callable[[str], None] = lambda line: None  # rank 0's lines for the user
    compile_backend: str | None = None  # compile the stage's transformer blocks with this torch.compile backend


def run_rank(job: RankJob, on_geometry: Callable[[int, int], Callable[[Chunk], None]] | None = None
             ) -> tuple[RankStats, object]:
    """This rank's part: checks, models, conditioning, then every block. On the decoding rank,
    `on_geometry(height, width)` returns the callback each chunk goes to. Returns (stats, the output
    check's result)."""
    layout, role, opts = job.layout, job.layout.role(job.rank), job.opts
    problem, inputs, output = None, None, None
    try:  # every input is checked, on the rank that uses it, before any model is loaded
        inputs = Inputs.load(job.image, job.audio, opts) if role.frontend else None
        output = job.check_output() if role.decodes and job.check_output is not None else None
    except UserError as exc:
        problem = exc
    if not launch.agree(problem is None):
        raise problem if problem is not None else InputRefused()
    height, width = launch.broadcast_ints([inputs.height, inputs.width] if role.frontend else None, 2)
    groups = launch.stage_groups(layout)
    pipe = job.build_pipe(role, not (layout.shard_weights and role.stage is not None))
    split_dit(pipe, layout, role, groups, pipe.device)
    if job.compile_backend and role.stage is not None:
        from liveavatar.runtime.compile import apply_compile

        apply_compile(pipe.dit, backend=job.compile_backend)
    cond, frontend = None, None
    if role.frontend:
        for line in inputs.warnings():
            job.say(f"warning: {line}")
        cond = encode_conditioning(pipe, inputs.ref, job.prompt)
        for line in cond.warnings:
            job.say(f"warning: {line}")
    cond = share_conditioning(pipe, cond, height, width)
    if role.frontend:
        tokens = SinkLayout(height // 8, width // 8, pipe.preset.dit.zip_frame_buckets)
        frontend = make_frontend(pipe, opts, tokens, speech_stream(inputs.speech))
        length = frontend.length
        job.say(f"{width}x{height} (WxH), {length.num_frames} frames in {length.num_blocks} blocks, seed {opts.seed}, "
                f"{layout.world} ranks: " + "; ".join(r.describe() for r in layout.roles()))
    part = PipelineRank(pipe, layout, role, opts, height, width, groups, frontend)
    part.start(cond)
    emit = on_geometry(height, width) if role.decodes and on_geometry is not None else None
    try:
        stats = part.run(emit)
    finally:
        part.close()
    launch.agree(True)  # every rank done
    return stats, output


class InputRefused(UserError):
    """Another rank refused its input (it says why)."""

    def __init__(self):
        super().__init__("another rank refused its input")


def generate(args, preset, opts, image: str, audio: str, make_output, runtime, start: float) -> int:
    """One rank's part of `liveavatar generate`; returns the exit code. `make_output()` checks and
    returns the OutputFile (called on the decoding rank only)."""
    from liveavatar.engine.pipeline import Pipeline
    from liveavatar.errors import Terminated
    from liveavatar.io import media
    from liveavatar.io.mp4 import MP4Writer

    rank, world, device = launch.init(args.dist_timeout)
    layout, role, writer, frames, heartbeat = None, None, None, 0, None
    try:
        heartbeat = launch.Heartbeat(rank, world)
        layout = layout_from_args(args, world, opts.sample_steps, preset.dit.num_heads)
        role = layout.role(rank)

        def build_pipe(role, place_dit):
            if args.ckpt_dir is None:
                return Pipeline.tiny(device=device, runtime=runtime, place_dit=place_dit)
            return Pipeline.from_checkpoint(args.ckpt_dir, args.lora_path_dmd, preset, device=device,
                                            dtype=getattr(torch, preset.dtype), runtime=runtime,
                                            parts=role_parts(role), place_dit=place_dit)

        def on_geometry(height, width):
            nonlocal writer

            writer = MP4Writer(out, width=width, height=height, fps=preset.fps, audio=True,
                               sample_rate=media.SAMPLE_RATE)

            def emit(chunk):
                nonlocal frames
                writer.write(chunk.frames, chunk.audio)
                frames += len(chunk.frames)
            return emit

        out = None

        def check_output():
            nonlocal out
            out = make_output()
            return out

        job = RankJob(layout, rank, opts, image, audio, args.prompt, build_pipe, check_output,
                      lambda line: print(line, file=sys.stderr),
                      compile_backend="inductor" if getattr(args, "compile", False) else None)
        t0 = time.time()
        stats, _ = run_rank(job, on_geometry)
        if role.decodes:
            path = writer.close()
            print(f"saved {path} ({frames} frames, {frames / preset.fps:.2f}s) in {time.time() - start:.1f}s "
                  f"({stats.blocks} blocks in {time.time() - t0:.1f}s)")
        return 0
    except InputRefused:
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        code = 130 if isinstance(stop, KeyboardInterrupt) else 143
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun may repeat it: finish the cleanup
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if heartbeat is not None:
            heartbeat.stopping()
        launch.report(layout, role, rank, None, heartbeat)
        _keep_partial(writer, role, frames, "stopped by " + ("Ctrl-C" if code == 130 else "SIGTERM"))
        return code
    except BaseException as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's stop must not cut the report short
        launch.report(layout, role, rank, exc, heartbeat)
        _keep_partial(writer, role, frames, "stopped")
        return 2 if isinstance(exc, UserError) else 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if heartbeat is not None:
            heartbeat.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _keep_partial(writer, role: Role | None, frames: int, why: str) -> None:
    if writer is None:
        return
    writer.abort()
    kept = (f"the partial video {str(writer.partial_path)!r} plays its {frames} frames" if writer.partial_path
            else "nothing was written")
    print(f"error: {role.describe()}: {why}; {kept}", file=sys.stderr, flush=True)


__all__ = ["RankJob", "generate", "layout_from_args", "role_parts", "run_rank", "share_conditioning", "split_dit"]
