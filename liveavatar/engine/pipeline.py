"""The model holder: one `Pipeline` per loaded model, on one device, making `Session`s.

A pipeline loads (or builds) the DiT, VAE, text and audio encoders of a preset and applies the runtime
layout chosen by the planner (FP8 weights, block streaming, encoder placement). Sessions
(`liveavatar.engine.session`) hold everything per generation; any number of them can be made from
one pipeline, one after another or side by side.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from liveavatar.config import Preset
from liveavatar.engine.session import GenerationOptions, Inputs, Session
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.runtime.memory import RuntimeConfig


def random_module(module_cls, cfg, dtype: torch.dtype, device, generator: torch.Generator,
                  in_place: bool = False) -> torch.nn.Module:
    """`module_cls(cfg)` built on meta, cast, then filled on `device`: norm scales 1, biases 0, other
    weights normal(0, 0.02) from `generator`: drawn on the CPU in chunks and copied (the same values on
    any device), or with `in_place` drawn on the device by a generator there (fast, device-specific)."""
    with torch.device("meta"):
        m = module_cls(cfg).to(dtype)  # cast on meta: no full-precision copy is ever allocated
    m = m.to_empty(device=device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight", "gamma", "norm.weight",
                              "norm1.weight", "norm2.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif in_place:
                p.normal_(0, 0.02, generator=generator)
            else:
                flat = p.view(-1)
                for i in range(0, flat.numel(), 1 << 26):
                    part = flat[i:i + (1 << 26)]
                    part.copy_(torch.randn(part.numel(), generator=generator).mul_(0.02))
    return m.eval()


class Pipeline:
    """Holds the models of one preset on one device; makes sessions."""

    def __init__(self, preset: Preset, dit: CausalS2VDiT, vae, text_encoder, tokenizer, audio_encoder,
                 device: str | torch.device = "cpu", runtime: RuntimeConfig | None = None, place_dit: bool = True):
        """`dit` is in host memory when `runtime` asks for FP8 or block streaming (they are applied
        here), else anywhere; the other models are where they will live (None: a model this process
        does not need, e.g. on a rank of a multi-GPU pipeline). With `place_dit` off the DiT stays where
        it is after FP8: the caller places it (sharded weights)."""
        self.preset, self.vae = preset, vae
        self.text_encoder, self.tokenizer, self.audio_encoder = text_encoder, tokenizer, audio_encoder
        self.device = torch.device(device)
        self.runtime = runtime or RuntimeConfig()
        self.dtype = (dit.patch_embedding.weight if dit is not None else vae.conv2.weight).dtype
        self.dit, self.streamer = self._place_dit(dit, place_dit) if dit is not None else (None, None)

    def _place_dit(self, dit: CausalS2VDiT, place: bool):
        rt = self.runtime
        if rt.fp8:
            from liveavatar.runtime.fp8 import apply_fp8

            apply_fp8(dit)  # after the LoRA merge, as the official code does
        from liveavatar.runtime.attention import apply_attention_backend

        apply_attention_backend(dit, rt.attention, self.device, self.dtype)  # --attention
        if not place:
            return dit, None
        if rt.resident_blocks is not None and rt.resident_blocks < len(dit.blocks):
            from liveavatar.runtime.offload import apply_block_streaming

            return dit, apply_block_streaming(dit, rt.resident_blocks, self.device)
        return dit.to(self.device), None

    @classmethod
    def tiny(cls, seed: int = 0, device="cpu", runtime: RuntimeConfig | None = None, place_dit: bool = True
             ) -> Pipeline:
        """The built-in tiny model: deterministic random weights, no checkpoint needed."""
        from liveavatar.config import TINY
        from liveavatar.models.t5 import T5Encoder, TextTokenizer
        from liveavatar.models.vae import WanVAE
        from liveavatar.models.wav2vec2 import AudioEncoder

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
        return cls(TINY, dit, vae, t5, TextTokenizer.builtin(TINY.t5.vocab_size), audio, device, runtime, place_dit)

    @classmethod
    def random_weights(cls, preset: Preset, device="cuda", dtype: torch.dtype = torch.bfloat16,
                       runtime: RuntimeConfig | None = None, seed: int = 0) -> Pipeline:
        """Every model of `preset` at full size with random weights, for speed and memory measurements
        (neither depends on weight values). Models are built on meta and materialised where they live."""
        from liveavatar.models.t5 import T5Encoder, TextTokenizer
        from liveavatar.models.vae import WanVAE
        from liveavatar.models.wav2vec2 import AudioEncoder

        runtime = runtime or RuntimeConfig()
        device = torch.device(device)
        host_first = runtime.fp8 or runtime.resident_blocks is not None
        enc_dev = "cpu" if runtime.offload_model else device
        gen = torch.Generator("cpu").manual_seed(seed)

        def make(module_cls, cfg, where):
            return random_module(module_cls, cfg, dtype, where, gen)

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
                        runtime: RuntimeConfig | None = None,
                        parts: tuple[str, ...] = ("dit", "vae", "text", "audio"),
                        place_dit: bool = True) -> Pipeline:
        """The real model from the official folders: `Wan2.2-S2V-14B/` and the Live Avatar LoRA.

        Every file is checked from its header first (seconds, nothing loaded), so a damaged file is
        reported before the 32 GB DiT is read. With `runtime.offload_model` the text and audio encoders
        live in host memory and move to the device only while they run; with `runtime.t5_cpu` the text
        encoder runs on the CPU. `parts`: the models to load (a rank of a multi-GPU pipeline loads only
        what its role needs)."""
        from liveavatar.config import S2V_14B
        from liveavatar.errors import UserError
        from liveavatar.io import checkpoint as ck
        from liveavatar.io.verify import verify_checkpoint
        from liveavatar.models.t5 import TextTokenizer
        from liveavatar.models.wav2vec2 import AudioEncoder

        preset = preset or S2V_14B
        runtime = runtime or RuntimeConfig()
        report = verify_checkpoint(ckpt_dir, lora_path=lora_path, preset=preset)
        if not report.ok:
            problems = report.problems
            raise UserError(f"the checkpoint {ckpt_dir} has {len(problems)} problem(s), the first: {problems[0]}; "
                            f"`liveavatar check-ckpt --ckpt_dir {ckpt_dir}` lists them all")
        paths = ck.ckpt_paths(ckpt_dir)
        enc_dev = "cpu" if runtime.offload_model else device
        tokenizer = TextTokenizer.from_folder(paths.tokenizer, preset.t5.text_len) if "text" in parts else None
        audio = AudioEncoder.from_folder(paths.audio, dtype).to(enc_dev).eval() if "audio" in parts else None
        host_first = runtime.fp8 or runtime.resident_blocks is not None or not place_dit  # transformed in host memory
        dit = None
        if "dit" in parts:
            dit = ck.load_dit(paths.root, preset.dit, dtype, "cpu" if host_first else device, lora_path=lora_path,
                              lora_rank=preset.lora_rank, lora_alpha=preset.lora_alpha).eval()
        vae = ck.load_vae(paths.vae, preset.vae, dtype, device).eval() if "vae" in parts else None
        t5 = None
        if "text" in parts:
            t5 = ck.load_t5(paths.t5, preset.t5, dtype, "cpu" if runtime.t5_cpu else enc_dev).eval()
        return cls(preset, dit, vae, t5, tokenizer, audio, device, runtime, place_dit)

    def session(self, image: str | os.PathLike | Inputs, audio: str | os.PathLike | np.ndarray | None = None,
                prompt: str = "", options: GenerationOptions | None = None) -> Session:
        """A session from a reference image and speech: a file path, 16 kHz mono samples, or None to
        push the speech later (`Session.push_audio`); or from `Inputs` already loaded (then `audio`
        is unused)."""
        opts = options or GenerationOptions()
        inputs = image if isinstance(image, Inputs) else Inputs.load(image, audio, opts)
        return Session.create(self, inputs, prompt, opts)

    def live_session(self, image: str | os.PathLike | Inputs, prompt: str = "",
                     options: GenerationOptions | None = None) -> Session:
        """A live session (`liveavatar.engine.live`): speech pushed as utterances (`push_audio`, then
        `end_audio` per utterance, `barge_in` to drop it); between utterances the avatar keeps moving;
        it runs until closed."""
        opts = options or GenerationOptions()
        inputs = image if isinstance(image, Inputs) else Inputs.load(image, None, opts)
        return Session.create(self, inputs, prompt, opts, live=True)

    def restore(self, state, audio=None) -> Session:
        """Continue a session saved with `Session.save` (see `Session.restore`)."""
        return Session.restore(self, state, audio)

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
