"""Known GPUs and their data-sheet rates: what the speed model (`liveavatar.runtime.speed`) assumes
about a GPU, identified from its device properties (name, compute capability, memory) or named by
the user (`liveavatar plan --gpu h100-sxm`), never guessed from its memory size.

Every rate is a published peak, not a measurement: dense (no 2:4 sparsity) tensor-core TFLOP/s in
bf16 and in FP8 e4m3, both with fp32 accumulation (the GeForce cards run fp16-accumulate at twice
these rates; PyTorch accumulates in fp32), and memory bandwidth. FP8 tensor cores exist from compute
capability 8.9 (Ada, Hopper, Blackwell); on older GPUs FP8 weights can only be dequantised
(`fp8_tflops` None). Sources, per family:
- H100 SXM / PCIe / NVL, H200: NVIDIA H100 and H200 Tensor Core GPU data sheets (2023-2024);
- A100 40/80 GB: NVIDIA A100 Tensor Core GPU data sheet (2021);
- L40S, L40, L4, RTX 6000 Ada, RTX 4090: NVIDIA L40S / L40 / L4 / RTX 6000 Ada data sheets and the
  NVIDIA Ada GPU architecture whitepaper v2.1 (appendix tables, "with FP32 accumulate");
- RTX 3090, RTX A6000, A10: NVIDIA Ampere GA102 GPU architecture whitepaper v2.0 and the A10 data sheet;
- B200: NVIDIA Blackwell (HGX B200) data sheet, per GPU.
Host links are nominal usable rates (PCIe 4.0 x16 ~25 GB/s, PCIe 5.0 x16 ~50 GB/s); GPU-to-GPU is the
NVLink rate per direction where the part has NVLink in its usual server form, else PCIe.
`memory_gib` is roughly what `torch.cuda.get_device_properties().total_memory` reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

GiB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    """What the planner knows about one GPU. Rates: dense tensor-core TFLOP/s and GB/s."""

    memory_bytes: int
    tflops: float = 165.2  # dense bf16, fp32 accumulate
    fp8_tflops: float | None = 330.3  # dense FP8 e4m3; None: no FP8 tensor cores (compute capability < 8.9)
    link_gbps: float = 25.0  # host <-> device (PCIe 4.0 x16 in practice)
    peer_gbps: float = 25.0  # GPU <-> GPU in one node, per GPU (PCIe; NVLink is 300-900)
    node_gbps: float = 25.0  # between nodes, per GPU (200 Gb/s networking)
    mem_gbps: float = 1008.0  # device memory bandwidth
    name: str = "unspecified GPU"
    compute_capability: tuple[int, int] = (8, 9)
    known: bool = False  # False: the rates are the stated default, not this GPU's

    @property
    def has_fp8(self) -> bool:
        return self.fp8_tflops is not None and self.compute_capability >= (8, 9)

    def with_memory(self, gib: float) -> GPUSpec:
        return replace(self, memory_bytes=int(gib * GiB))

    def describe(self) -> str:
        fp8 = f"{self.fp8_tflops:g} FP8" if self.has_fp8 else "no FP8 tensor cores"
        rates = (f"{self.tflops:g} bf16 / {fp8} TFLOP/s, {self.mem_gbps:g} GB/s memory, "
                 f"{self.link_gbps:g} GB/s host link")
        if self.known:
            return f"{self.name} (sm {self.compute_capability[0]}.{self.compute_capability[1]}; {rates})"
        return f"{self.name} ({rates}: assumed; pass --gpu NAME for a known GPU)"


@dataclass(frozen=True)
class _Entry:
    key: str  # what `--gpu` accepts
    pattern: str  # regular expression on the CUDA device name (case-insensitive)
    cc: tuple[int, int]
    memory_gib: float
    bf16: float
    fp8: float | None
    mem_gbps: float
    link_gbps: float
    peer_gbps: float


# More specific patterns first: the first match wins.
KNOWN_GPUS: tuple[_Entry, ...] = (
    _Entry("h200", r"H200", (9, 0), 140.4, 989.4, 1978.9, 4800, 50, 450),
    _Entry("h100-nvl", r"H100.*NVL", (9, 0), 93.6, 835.0, 1670.0, 3900, 50, 300),
    _Entry("h100-pcie", r"H100.*PCIe", (9, 0), 79.6, 756.0, 1513.0, 2000, 50, 50),
    _Entry("h100-sxm", r"H100", (9, 0), 79.6, 989.4, 1978.9, 3350, 50, 450),
    _Entry("a100-80gb-pcie", r"A100.*80GB.*PCIe|A100.*PCIe.*80GB", (8, 0), 79.2, 312.0, None, 1935, 25, 25),
    _Entry("a100-80gb", r"A100.*80GB", (8, 0), 79.2, 312.0, None, 2039, 25, 300),
    _Entry("a100-40gb", r"A100", (8, 0), 39.4, 312.0, None, 1555, 25, 300),
    _Entry("b200", r"B200", (10, 0), 178.4, 2250.0, 4500.0, 8000, 50, 900),
    _Entry("l40s", r"L40S", (8, 9), 44.4, 362.1, 733.0, 864, 25, 25),
    _Entry("l40", r"L40\b", (8, 9), 44.4, 181.0, 362.1, 864, 25, 25),
    _Entry("l4", r"\bL4\b", (8, 9), 22.0, 121.0, 242.5, 300, 25, 25),
    _Entry("rtx6000-ada", r"RTX 6000 Ada", (8, 9), 47.5, 364.2, 728.5, 960, 25, 25),
    _Entry("rtx4090", r"RTX 4090", (8, 9), 23.6, 165.2, 330.3, 1008, 25, 25),
    _Entry("rtx3090", r"RTX 3090", (8, 6), 23.6, 71.0, None, 936, 25, 25),
    _Entry("rtx-a6000", r"RTX A6000", (8, 6), 47.5, 154.8, None, 768, 25, 25),
    _Entry("a10", r"\bA10\b", (8, 6), 22.0, 125.0, None, 600, 25, 25),
)
GPU_NAMES = tuple(e.key for e in KNOWN_GPUS)
DEFAULT_GPU = "rtx4090"  # the rates `plan` assumes when it is told only a memory size


def _spec(e: _Entry, memory_bytes: int | None = None, name: str | None = None) -> GPUSpec:
    return GPUSpec(memory_bytes=int(e.memory_gib * GiB) if memory_bytes is None else memory_bytes,
                   tflops=e.bf16, fp8_tflops=e.fp8 if e.cc >= (8, 9) else None, link_gbps=e.link_gbps,
                   peer_gbps=e.peer_gbps, node_gbps=e.link_gbps, mem_gbps=e.mem_gbps, name=name or e.key,
                   compute_capability=e.cc, known=True)


def gpu_named(key: str, memory_gib: float | None = None) -> GPUSpec:
    """The table's GPU `key` (case-insensitive), with its memory or `memory_gib`."""
    for e in KNOWN_GPUS:
        if e.key == key.lower():
            return _spec(e, None if memory_gib is None else int(memory_gib * GiB))
    raise KeyError(key)


def default_gpu(memory_gib: float) -> GPUSpec:
    """A GPU known only by its memory: the rates of `DEFAULT_GPU`, stated as assumed (never inferred
    from the memory size)."""
    return replace(gpu_named(DEFAULT_GPU, memory_gib), name="unspecified GPU", known=False)


def identify(name: str, capability: tuple[int, int], total_memory: int) -> GPUSpec:
    """The spec of a CUDA device from its properties. A name the table does not know keeps the default
    rates (labelled as assumed) with FP8 only if the compute capability has FP8 tensor cores."""
    for e in KNOWN_GPUS:
        if re.search(e.pattern, name, flags=re.IGNORECASE) and e.cc[0] == capability[0]:
            return _spec(e, total_memory, name)
    base = default_gpu(total_memory / GiB)
    return replace(base, name=name, compute_capability=tuple(capability),
                   fp8_tflops=base.fp8_tflops if tuple(capability) >= (8, 9) else None)


def from_device(device=None) -> GPUSpec:
    """The spec of a CUDA device (default: the current one)."""
    import torch

    p = torch.cuda.get_device_properties(device)
    return identify(p.name, (p.major, p.minor), p.total_memory)


__all__ = ["DEFAULT_GPU", "GPUSpec", "GPU_NAMES", "KNOWN_GPUS", "default_gpu", "from_device", "gpu_named", "identify"]
