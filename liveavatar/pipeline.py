"""The streaming engine: one `Pipeline` (models) and per-request `Session`s (state + generator).

A session is set up from a reference image, a speech track and a prompt: output size, reference and
motion latents, text context, audio features, one ring KV cache per denoising step, the sink cache
(prefilled once) and the streaming VAE decoder state. Iterating it yields `Chunk`s, one per block
of 3 latent frames: uint8 RGB frames plus the audio samples that play with them. Everything else
(the CLI, files, servers) consumes this generator.

Semantics follow the official streaming pipeline: 4-step Euler with timestep forcing (cache i is
only used by step i), fresh noise per clip from `seed + clip`, the rolling-sink distance d drawn
per DiT call, the sink re-prefilled once at the start of clip 1 with the first generated latent as
the reference, online VAE decode warmed up on 7 motion latents, and the first 3 frames of the video
dropped (48·N − 3 frames for N clips). Deliberate differences, all documented in docs/design.md:
noise and d come from the session's own seeded generators (so a seed reproduces a video on any
device); the muxed audio starts 3 frames (0.12 s) in, so that each frame plays with the audio it was
generated from; by default the clip count covers the audio instead of always adding one, and the
video is trimmed to the audio's length.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from liveavatar import media
from liveavatar.config import Preset
from liveavatar.dit import CausalS2VDiT
from liveavatar.errors import UserError
from liveavatar.kv_cache import FP8RingKVCache, HostRingKVCache, RingKVCache, SinkCache, SinkLayout
from liveavatar.memory import RuntimeConfig
from liveavatar.rope import to_device
from liveavatar.sampler import euler_step, make_schedule
from liveavatar.t5 import encode_text
from liveavatar.vae import VAEStreamState

DROP_FIRST_FRAMES = 3  # frames dropped at the start of the video, as the official pipelines do
VAE_WARMUP_LATENTS = 7  # motion latents decoded (and discarded) to prime the streaming decoder


@dataclass(frozen=True)
class GenerationOptions:
    size: int = 704 * 384  # area cap in pixels; the output keeps the image aspect, sides multiple of 64
    infer_frames: int = 48  # video frames per clip (multiple of 12)
    num_clip: int | None = None  # at most this many clips (None: as many as the audio needs, trimmed to it)
    seed: int = 42
    sample_steps: int = 4
    online_decode: bool = True  # decode each block as soon as it is denoised
    sink_refresh: bool = True  # re-prefill the sink at clip 1 with the first generated latent
    # Video frames into the speech where the muxed audio starts: DROP_FIRST_FRAMES keeps each frame
    # with the audio it was generated from; 0 reproduces the official muxing (video 0.12 s early).
    audio_offset_frames: int = DROP_FIRST_FRAMES


@dataclass
class Chunk:
    index: int  # block index
    frame_start: int  # index of the first frame in the output video
    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # float32 mono samples at 16 kHz that play with these frames


@dataclass
class Inputs:
    """Validated user inputs, prepared before any model is loaded."""

    ref: torch.Tensor  # [3, H, W] float32 in [-1, 1]
    height: int
    width: int
    wave: np.ndarray  # float32 mono at 16 kHz
    silent: bool

    @classmethod
    def load(cls, image: str, audio: str, opts: GenerationOptions) -> Inputs:
        check_options(opts)
        ref, (h, w) = media.load_reference_image(image, opts.size)
        wave = media.load_audio(audio)
        return cls(ref, h, w, wave, media.audio_is_silent(wave))


def check_options(opts: GenerationOptions) -> None:
    if opts.infer_frames <= 0 or opts.infer_frames % 12:
        raise UserError(f"--infer_frames {opts.infer_frames} is not a positive multiple of 12; use 48")
    if opts.num_clip is not None and opts.num_clip <= 0:
        raise UserError(f"--num_clip {opts.num_clip} must be at least 1 (or omit it to follow the audio)")
    if not 0 <= opts.audio_offset_frames <= DROP_FIRST_FRAMES:
        raise UserError(f"--audio_offset_frames {opts.audio_offset_frames} must be between 0 and {DROP_FIRST_FRAMES}")
    if opts.sample_steps <= 0:
        raise UserError(f"--sample_steps {opts.sample_steps} must be at least 1; the distilled model uses 4")


@dataclass(frozen=True)
class StreamLength:
    num_clips: int
    num_blocks: int
    num_frames: int  # frames in the output video


def stream_length(num_samples: int, opts: GenerationOptions, fps: int = 25, frames_per_block: int = 3) -> StreamLength:
    """Clips, blocks and output frames for an audio of `num_samples` at 16 kHz.

    As many clips as the audio needs, the video trimmed to the audio (the first 3 generated frames
    are dropped). `num_clip` N caps that, as in the official scripts (whose `--num_clip 10000` means
    "the whole audio"): when the audio needs more than N clips, exactly 48·N − 3 frames."""
    f = opts.infer_frames
    audio_frames = math.ceil(num_samples * fps / media.SAMPLE_RATE)
    needed = max(1, math.ceil(audio_frames / f))
    if opts.num_clip is not None and opts.num_clip < needed:
        clips, frames = opts.num_clip, opts.num_clip * f - DROP_FIRST_FRAMES
    else:
        clips, frames = needed, max(1, min(needed * f, audio_frames) - DROP_FIRST_FRAMES)
    per_block = 4 * frames_per_block
    blocks = min(clips * f // per_block, math.ceil((frames + DROP_FIRST_FRAMES) / per_block))
    return StreamLength(clips, blocks, frames)


def muxed_audio(wave: np.ndarray, num_frames: int, fps: int = 25, offset_frames: int = DROP_FIRST_FRAMES
                ) -> np.ndarray:
    """The audio that plays with output frames [0, num_frames): starts `offset_frames` frames into the
    speech, zero-padded to the video length."""
    sr = media.SAMPLE_RATE
    a0 = offset_frames * sr // fps
    a1 = (offset_frames + num_frames) * sr // fps
    out = np.zeros(a1 - a0, np.float32)
    seg = wave[a0:a1]
    out[: len(seg)] = seg
    return out


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 (clamped, truncated like the official writer)."""
    x = ((video.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


class Pipeline:
    """Holds the models of one preset on one device; makes sessions."""

    def __init__(self, preset: Preset, dit: CausalS2VDiT, vae, text_encoder, tokenizer, audio_encoder,
                 device: str | torch.device = "cpu", runtime: RuntimeConfig | None = None):
        """`dit` is in host memory when `runtime` asks for FP8 or block streaming (they are applied
        here), else anywhere; the other models are where they will live."""
        self.preset, self.vae = preset, vae
        self.text_encoder, self.tokenizer, self.audio_encoder = text_encoder, tokenizer, audio_encoder
        self.device = torch.device(device)
        self.runtime = runtime or RuntimeConfig()
        self.dtype = dit.patch_embedding.weight.dtype
        self.dit, self.streamer = self._place_dit(dit)

    def _place_dit(self, dit: CausalS2VDiT):
        rt = self.runtime
        if rt.fp8:
            from liveavatar.fp8 import apply_fp8

            apply_fp8(dit)  # after the LoRA merge, as the official code does
        if rt.resident_blocks is not None and rt.resident_blocks < len(dit.blocks):
            from liveavatar.offload import apply_block_streaming

            return dit, apply_block_streaming(dit, rt.resident_blocks, self.device)
        return dit.to(self.device), None

    @classmethod
    def tiny(cls, seed: int = 0, device="cpu", runtime: RuntimeConfig | None = None) -> Pipeline:
        """The built-in tiny model: deterministic random weights, no checkpoint needed."""
        from liveavatar.audio import AudioEncoder
        from liveavatar.config import TINY
        from liveavatar.t5 import T5Encoder, TextTokenizer
        from liveavatar.vae import WanVAE

        torch.manual_seed(seed)
        dit = CausalS2VDiT(TINY.dit).eval()
        vae = WanVAE(TINY.vae).eval()
        t5 = T5Encoder(TINY.t5).eval()
        audio = AudioEncoder.random(TINY.audio, seed=seed)
        runtime = runtime or RuntimeConfig()
        enc_dev = "cpu" if runtime.offload_model or runtime.t5_cpu else device
        vae.to(device)
        t5.to("cpu" if runtime.t5_cpu else enc_dev)
        audio.to(enc_dev)
        return cls(TINY, dit, vae, t5, TextTokenizer.builtin(TINY.t5.vocab_size), audio, device, runtime)

    @classmethod
    def random_weights(cls, preset: Preset, device="cuda", dtype: torch.dtype = torch.bfloat16,
                       runtime: RuntimeConfig | None = None, seed: int = 0) -> Pipeline:
        """Every model of `preset` at full size with random weights, for speed and memory measurements
        (neither depends on weight values). Models are built on meta and materialised where they live."""
        from liveavatar.audio import AudioEncoder
        from liveavatar.t5 import T5Encoder, TextTokenizer
        from liveavatar.vae import WanVAE

        runtime = runtime or RuntimeConfig()
        device = torch.device(device)
        host_first = runtime.fp8 or runtime.resident_blocks is not None
        enc_dev = "cpu" if runtime.offload_model else device
        gen = torch.Generator("cpu").manual_seed(seed)

        def make(module_cls, cfg, where):
            with torch.device("meta"):
                m = module_cls(cfg).to(dtype)  # cast on meta: no full-precision copy is ever allocated
            m = m.to_empty(device=where)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight", "gamma", "norm.weight",
                                      "norm1.weight", "norm2.weight")):
                        p.fill_(1.0)
                    elif name.endswith("bias"):
                        p.zero_()
                    else:  # drawn on the CPU in chunks: same values on any device
                        flat = p.view(-1)
                        for i in range(0, flat.numel(), 1 << 26):
                            part = flat[i:i + (1 << 26)]
                            part.copy_(torch.randn(part.numel(), generator=gen).mul_(0.02))
            return m.eval()

        dit = make(CausalS2VDiT, preset.dit, "cpu" if host_first else device)
        with torch.no_grad():
            dit.casual_audio_encoder.weights.fill_(0.5)
        vae = make(WanVAE, preset.vae, device)
        t5 = make(T5Encoder, preset.t5, "cpu" if runtime.t5_cpu else enc_dev)
        audio = AudioEncoder.random(preset.audio, seed=seed, dtype=dtype).to(enc_dev)
        tokenizer = TextTokenizer.builtin(preset.t5.vocab_size, preset.t5.text_len)
        return cls(preset, dit, vae, t5, tokenizer, audio, device, runtime)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, lora_path: str | None = None, preset: Preset | None = None,
                        device="cuda", dtype: torch.dtype = torch.bfloat16,
                        runtime: RuntimeConfig | None = None) -> Pipeline:
        """The real model from the official folders: `Wan2.2-S2V-14B/` and the Live Avatar LoRA.

        With `runtime.offload_model` the text and audio encoders live in host memory and move to the
        device only while they run; with `runtime.t5_cpu` the text encoder runs on the CPU."""
        from liveavatar import checkpoint as ck
        from liveavatar.audio import AudioEncoder
        from liveavatar.config import S2V_14B
        from liveavatar.t5 import TextTokenizer

        preset = preset or S2V_14B
        runtime = runtime or RuntimeConfig()
        paths = ck.ckpt_paths(ckpt_dir)
        enc_dev = "cpu" if runtime.offload_model else device
        tokenizer = TextTokenizer.from_folder(paths.tokenizer, preset.t5.text_len)
        audio = AudioEncoder.from_folder(paths.audio, dtype).to(enc_dev).eval()
        host_first = runtime.fp8 or runtime.resident_blocks is not None  # transformed in host memory
        dit = ck.load_dit(paths.root, preset.dit, dtype, "cpu" if host_first else device, lora_path=lora_path,
                          lora_rank=preset.lora_rank, lora_alpha=preset.lora_alpha).eval()
        vae = ck.load_vae(paths.vae, preset.vae, dtype, device).eval()
        t5 = ck.load_t5(paths.t5, preset.t5, dtype, "cpu" if runtime.t5_cpu else enc_dev).eval()
        return cls(preset, dit, vae, t5, tokenizer, audio, device, runtime)

    def session(self, image: str | Inputs, audio: str | None = None, prompt: str = "",
                options: GenerationOptions | None = None) -> Session:
        """A session from file paths, or from `Inputs` already loaded (then `audio` is unused)."""
        opts = options or GenerationOptions()
        inputs = image if isinstance(image, Inputs) else Inputs.load(image, audio, opts)
        return Session(self, inputs, prompt, opts)

    def run_encoder(self, module, fn):
        """Run `fn(module)` on the compute device, then put the module back where it lives; the text
        encoder stays on the CPU with `runtime.t5_cpu`."""
        home = next(module.parameters()).device
        if module is self.text_encoder and self.runtime.t5_cpu:
            return fn(module)
        if home != self.device:
            module.to(self.device)
        try:
            return fn(module)
        finally:
            if home != self.device:
                module.to(home)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


class Session:
    """State of one generation; iterate it to get `Chunk`s."""

    def __init__(self, pipe: Pipeline, inputs: Inputs, prompt: str, opts: GenerationOptions):
        cfg = pipe.preset.dit
        check_options(opts)
        self.pipe, self.opts = pipe, opts
        dev, dtype = pipe.device, pipe.dtype
        fps = pipe.preset.fps
        ref, self.height, self.width, self.wave = inputs.ref, inputs.height, inputs.width, inputs.wave
        self.silent = inputs.silent
        f = opts.infer_frames
        length = stream_length(len(self.wave), opts, fps, cfg.frames_per_block)
        self.num_clips, self.num_blocks, self.num_frames = length.num_clips, length.num_blocks, length.num_frames
        self.blocks_per_clip = f // 4 // cfg.frames_per_block
        self.schedule = make_schedule(pipe.preset.sampler, opts.sample_steps)
        h, w = self.height // 8, self.width // 8
        self.latent_hw = (h, w)
        self.layout = SinkLayout(h, w, cfg.zip_frame_buckets)

        with torch.no_grad():
            ctx = pipe.run_encoder(pipe.text_encoder, lambda m: encode_text(m, pipe.tokenizer, prompt))
            self.text = pipe.dit.embed_text(ctx.to(dev))
            feats = pipe.run_encoder(pipe.audio_encoder, lambda m: m.features(self.wave, self.num_clips * f, fps=fps))
            # [1, 25, C_a, N·F] kept in host memory (51 KB a frame in bf16); each block moves its slice.
            self.audio_feats = feats.to("cpu", dtype)
            ref = ref.to(dev, dtype)
            # Reference latent: second latent of the 5-frame still clip; motion: 73-frame still clip.
            self.ref_latent = pipe.vae.encode(ref[None, :, None].expand(1, 3, 5, -1, -1))[:, :, 1:2]
            self.motion_latents = pipe.vae.encode(ref[None, :, None].expand(1, 3, cfg.motion_frames, -1, -1))

        n_dev = len(self.schedule) if pipe.runtime.kv_on_device is None else pipe.runtime.kv_on_device
        on_device = FP8RingKVCache if pipe.runtime.kv_fp8 else RingKVCache
        self.rings = [(on_device if i < n_dev else HostRingKVCache).allocate(cfg, self.layout.fs, dtype, dev)
                      for i in range(len(self.schedule))]
        self.sink = SinkCache.allocate(cfg, self.layout, dtype, dev)
        self._audio = None
        self.rng = random.Random(opts.seed)
        self.noise_gen = torch.Generator("cpu")

    @property
    def latent_frames_per_clip(self) -> int:
        return self.opts.infer_frames // 4

    def _clip_noise(self, clip: int) -> torch.Tensor:
        h, w = self.latent_hw
        self.noise_gen.manual_seed(self.opts.seed + clip)
        c = self.pipe.preset.dit.in_dim
        z = torch.randn(1, c, self.latent_frames_per_clip, h, w, generator=self.noise_gen)
        return to_device(z.to(self.pipe.dtype), self.pipe.device)

    def _prefill(self, ref_latent: torch.Tensor) -> None:
        self.pipe.dit.prefill_sink(ref_latent, self.motion_latents, self.text, self.sink)

    def denoise_block(self, n: int, noise: torch.Tensor) -> torch.Tensor:
        """4-step denoise of block n (absolute latent frames 3n..3n+2). noise: [1, C, 3, h, w]."""
        fpb = self.pipe.preset.dit.frames_per_block
        lo, hi = self.pipe.preset.dit.rsfm_d_range
        a = to_device(self.audio_feats[..., 4 * fpb * n: 4 * fpb * (n + 1)], self.pipe.device)
        z = noise
        for i, t in enumerate(self.schedule.timesteps):
            v = self.pipe.dit(z, t, a, self.text, self.rings[i], self.sink, frame_start=fpb * n,
                              d=self.rng.randint(lo, hi))
            z = euler_step(z, v, self.schedule, i)
        return z

    def latents(self) -> Iterator[torch.Tensor]:
        """Clean latents block by block: [1, C, 3, h, w]. Each iteration starts the stream afresh (same
        seed, same output); stale ring slots are never read, since block n only attends to slots that
        blocks up to n wrote."""
        fpb = self.pipe.preset.dit.frames_per_block
        self.rng = random.Random(self.opts.seed)
        with torch.no_grad():
            self._prefill(self.ref_latent)
            first = None
            for n in range(self.num_blocks):
                clip, b = divmod(n, self.blocks_per_clip)
                if b == 0:
                    noise = self._clip_noise(clip)
                    if clip == 1 and self.opts.sink_refresh:
                        self._prefill(first)
                z = self.denoise_block(n, noise[:, :, fpb * b: fpb * (b + 1)])
                if n == 0:
                    first = z[:, :, :1].clone()
                yield z

    def _chunk(self, n: int, video: torch.Tensor, emitted: int) -> Chunk | None:
        frames = to_uint8(video[0])
        if n == 0:
            frames = frames[DROP_FIRST_FRAMES:]
        frames = frames[: max(0, self.num_frames - emitted)]
        if len(frames) == 0:
            return None
        sr, fps = media.SAMPLE_RATE, self.pipe.preset.fps
        a0 = emitted * sr // fps
        a1 = (emitted + len(frames)) * sr // fps
        return Chunk(n, emitted, frames, self.audio[a0:a1])

    @property
    def audio(self) -> np.ndarray:
        """The whole muxed track (16 kHz mono) for the output video."""
        if self._audio is None:
            self._audio = muxed_audio(self.wave, self.num_frames, self.pipe.preset.fps, self.opts.audio_offset_frames)
        return self._audio

    def __iter__(self) -> Iterator[Chunk]:
        vae = self.pipe.vae
        with torch.no_grad():
            state = VAEStreamState()
            vae.decode_stream(self.motion_latents[:, :, :VAE_WARMUP_LATENTS], state)
            emitted = 0
            # Online: decode each block as soon as it is denoised. Offline: all latents first, then
            # the decode, block by block (same frames, memory bounded by one block).
            latents = self.latents() if self.opts.online_decode else iter(list(self.latents()))
            for n, z in enumerate(latents):
                chunk = self._chunk(n, vae.decode_stream(z, state), emitted)
                if chunk is not None:
                    emitted += len(chunk.frames)
                    yield chunk
