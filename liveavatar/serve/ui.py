"""`liveavatar ui`: a Gradio app for one person at a machine with the model loaded.

Pick a reference image, give speech (a file or the microphone) and a prompt, choose a size: the video
plays while it is generated (segments of about two seconds, each with its sound), and the whole MP4
is offered when it is done. Beside the form, the memory planner's verdict for the chosen size on the
GPU chosen (this machine's, or one from the planner's table).

Gradio is an optional dependency (`pip install 'liveavatar[ui]'`); import this module only to run it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from liveavatar.engine.session import GenerationOptions, check_options
from liveavatar.errors import UserError
from liveavatar.io import media
from liveavatar.io.mp4 import MP4Writer

SIZES = ["704*384", "384*704", "512*512", "384*256", "256*256", "128*128"]
SEGMENT_SECONDS = 2.0
THIS_MACHINE = "this machine"


def plan_text(preset_name: str, size: str, gpu_key: str) -> str:
    """The planner's verdict for the full-size model at `size` on a GPU (Markdown)."""
    from liveavatar.config import get_preset
    from liveavatar.runtime import gpus, memory

    preset = get_preset(preset_name)
    try:
        if gpu_key == THIS_MACHINE:
            import torch

            if not torch.cuda.is_available():
                return "No GPU on this machine: pick one from the list to plan for it."
            gpu = gpus.from_device()
        else:
            gpu = gpus.gpu_named(gpu_key)
        h, w = media.target_size(384, 704, media.parse_size(size)) if size != "704*384" else (384, 704)
        if size == "384*704":
            h, w = 704, 384
        best = memory.plan(preset, gpu, h, w)
    except UserError as exc:
        return f"error: {exc}"
    return f"```\n{memory.format_plan(best, gpu)}\n```"


def segments(pipe, image: str, audio: str, prompt: str, size: str, seed: int, workdir: Path,
             segment_seconds: float = SEGMENT_SECONDS) -> Iterator[tuple[Path | None, Path | None]]:
    """Generate, yielding (segment, None) for every ~`segment_seconds` of video and (None, whole MP4)
    at the end. Each segment is a playable MP4 with its sound."""
    if not image:
        raise UserError("pick a reference image")
    if not audio:
        raise UserError("give speech: a file or a recording")
    opts = GenerationOptions(size=media.parse_size(size), seed=int(seed))
    check_options(opts)
    fps = pipe.preset.fps
    with pipe.session(image, audio, prompt, opts) as session:
        whole = None
        seg, seg_frames, n = None, 0, 0
        for chunk in session:
            if whole is None:
                h, w = chunk.frames.shape[1:3]
                whole = MP4Writer(workdir / "liveavatar.mp4", width=w, height=h, fps=fps, audio=True,
                                  sample_rate=media.SAMPLE_RATE)
            whole.write(chunk.frames, chunk.audio)
            if seg is None:
                seg = MP4Writer(workdir / f"segment-{n:05d}.mp4", width=w, height=h, fps=fps, audio=True,
                                sample_rate=media.SAMPLE_RATE)
            seg.write(chunk.frames, chunk.audio)
            seg_frames += len(chunk.frames)
            if seg_frames >= segment_seconds * fps:
                yield seg.close(), None
                seg, seg_frames, n = None, 0, n + 1
        if seg is not None:
            yield seg.close(), None
        if whole is not None:
            yield None, whole.close()


def build_app(pipe, preset_name: str = "s2v-14b"):
    import gradio as gr

    from liveavatar.runtime import gpus

    gpu_choices = [THIS_MACHINE] + [e.key for e in gpus.KNOWN_GPUS]
    default_size = "704*384" if pipe.preset.name != "tiny" else "128*128"

    def run(image, audio, prompt, size, seed):
        workdir = Path(tempfile.mkdtemp(prefix="liveavatar-ui-"))
        try:
            for segment, whole in segments(pipe, image, audio, prompt, size, seed, workdir):
                yield (str(segment) if segment else gr.skip()), (str(whole) if whole else gr.skip())
        except UserError as exc:
            raise gr.Error(" ".join(str(exc).split())) from None

    with gr.Blocks(title="liveavatar") as app:
        gr.Markdown("# liveavatar\nA reference image, speech and a prompt: the avatar talks as it is generated.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Reference image", value=str(media.example_image_path()))
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech",
                                 value=str(media.example_audio_path()))
                prompt = gr.Textbox(label="Prompt", value="A person is talking to the camera with natural "
                                    "expressions and gestures, in a bright room, realistic, high quality.")
                with gr.Row():
                    size = gr.Dropdown(SIZES, value=default_size, label="Size")
                    seed = gr.Number(value=42, precision=0, label="Seed")
                go = gr.Button("Generate", variant="primary")
                with gr.Accordion("Will it fit? (the memory planner, full-size model)", open=False):
                    gpu = gr.Dropdown(gpu_choices, value=THIS_MACHINE, label="GPU")
                    verdict = gr.Markdown(plan_text(preset_name, default_size, THIS_MACHINE))
            with gr.Column():
                live = gr.Video(label="Live", streaming=True, autoplay=True)
                whole = gr.File(label="The whole video")
        go.click(run, [image, audio, prompt, size, seed], [live, whole], concurrency_limit=1)
        for control in (size, gpu):
            control.change(lambda s, g: plan_text(preset_name, s, g), [size, gpu], verdict)
    return app


def launch(pipe, host: str, port: int, preset_name: str) -> None:
    build_app(pipe, preset_name).queue().launch(server_name=host, server_port=port, show_error=True)


__all__ = ["build_app", "launch", "plan_text", "segments"]
