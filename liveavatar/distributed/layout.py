"""Who does what in a multi-process generation: the parallel layout.

`world` processes (ranks, one GPU each) split into:
- **denoise stages** (timestep pipeline parallelism): `denoise_ranks / ulysses` stages in a chain,
  each owning consecutive denoising steps (as even as possible, earlier stages take the extra step);
  a block's latents pass stage to stage;
- inside a stage, a **sequence-parallel group** of `ulysses` ranks that run the same forward on
  their share of the tokens (attention heads split with all-to-all) and, with `shard_weights`, each
  hold 1/ulysses of the transformer blocks' weights (gathered one block ahead);
- the **decode** stage: its own rank (`decode_rank`, the last one) or the last stage's first rank.

Rank 0 is also the frontend: it reads the speech, encodes the conditioning and makes the block tasks.
Ranks are numbered stage by stage, so a stage's group is consecutive ranks (one node holds whole
groups when the GPUs per node are a multiple of `ulysses`).
"""

from __future__ import annotations

from dataclasses import dataclass

from liveavatar.errors import UserError


@dataclass(frozen=True)
class Role:
    rank: int
    stage: int | None  # denoise stage, None on a decode-only rank
    group_rank: int  # rank inside the stage's sequence-parallel group
    steps: tuple[int, ...]  # denoising steps this rank runs
    decodes: bool  # runs the decode stage and writes the video
    frontend: bool  # reads speech, encodes the conditioning, makes the tasks

    @property
    def leader(self) -> bool:
        """The rank of its group that exchanges latents with the neighbouring stages."""
        return self.stage is not None and self.group_rank == 0

    def describe(self) -> str:
        parts = []
        if self.stage is not None:
            first, last = self.steps[0], self.steps[-1]
            steps = f"step {first}" if first == last else f"steps {first}-{last}"
            parts.append(f"denoise stage {self.stage} ({steps})")
        if self.decodes:
            parts.append("decode")
        return f"rank {self.rank}, " + " + ".join(parts)


@dataclass(frozen=True)
class ParallelLayout:
    denoise_ranks: int  # --num_gpus_dit
    ulysses: int = 1  # --ulysses_size: ranks per denoise stage
    shard_weights: bool = False  # --dit_fsdp: blocks' weights sharded inside each stage's group
    decode_rank: bool = False  # --enable_vae_parallel: the decode stage on its own (last) rank
    steps: int = 4

    @property
    def world(self) -> int:
        return self.denoise_ranks + int(self.decode_rank)

    @property
    def stages(self) -> int:
        return self.denoise_ranks // self.ulysses

    def check(self, num_heads: int, world: int | None = None) -> ParallelLayout:
        """Refuse layouts that cannot run (with the fix in the message); returns self."""
        if self.denoise_ranks < 1:
            raise UserError(f"--num_gpus_dit {self.denoise_ranks} must be at least 1")
        if self.ulysses < 1 or self.denoise_ranks % self.ulysses:
            raise UserError(f"--ulysses_size {self.ulysses} must divide --num_gpus_dit {self.denoise_ranks}")
        if num_heads % self.ulysses:
            raise UserError(f"--ulysses_size {self.ulysses} must divide the model's {num_heads} attention heads")
        if self.stages > self.steps:
            raise UserError(f"{self.stages} denoise stages for {self.steps} denoising steps: each stage needs a step; "
                            f"use at most {self.steps * self.ulysses} denoise GPUs (or a larger --ulysses_size)")
        if self.shard_weights and self.ulysses == 1:
            raise UserError("--dit_fsdp shards weights across the ranks that run the same forward (a sequence-"
                            "parallel group); with --ulysses_size 1 there is none: add --ulysses_size 2 or more")
        if world is not None and world != self.world:
            raise UserError(f"{world} processes were started but --num_gpus_dit {self.denoise_ranks}"
                            f"{' + --enable_vae_parallel' if self.decode_rank else ''} needs {self.world}; start "
                            f"{self.world} (torchrun --nproc_per_node ...) or change the flags")
        return self

    def stage_steps(self) -> list[tuple[int, ...]]:
        """Consecutive steps of each stage: as even as possible, the earlier stages take the extra."""
        q, r = divmod(self.steps, self.stages)
        out, first = [], 0
        for s in range(self.stages):
            k = q + (s < r)
            out.append(tuple(range(first, first + k)))
            first += k
        return out

    def group(self, stage: int) -> list[int]:
        return list(range(stage * self.ulysses, (stage + 1) * self.ulysses))

    @property
    def decoder(self) -> int:
        """The rank that decodes and writes the video."""
        return self.denoise_ranks if self.decode_rank else (self.stages - 1) * self.ulysses

    def role(self, rank: int) -> Role:
        if rank >= self.denoise_ranks:
            return Role(rank, None, 0, (), True, False)
        stage, group_rank = divmod(rank, self.ulysses)
        return Role(rank, stage, group_rank, self.stage_steps()[stage], rank == self.decoder, rank == 0)

    def roles(self) -> list[Role]:
        return [self.role(r) for r in range(self.world)]


__all__ = ["ParallelLayout", "Role"]
