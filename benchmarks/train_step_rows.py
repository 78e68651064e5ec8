"""What the training-step benchmark measures: presets, the rows (variants) and their toggles."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    model: str
    input_size: int
    in_channels: int
    num_classes: int
    batch: int | str            # "auto": the largest candidate that fits (GPU)
    precision: str              # "fp32" or "bf16" (autocast)
    device: str
    warmup: int
    repeats: int
    steps: int                  # timed steps per variant per round
    toggles: str                # "all", "none" or a comma list


PRESETS = {
    # a mid-sized CPU model: 256 wide, 8 deep, SRA 2 -> 6, batch 64, 256 tokens (~10 M parameters)
    "cpu-mini": Preset("SiT-M/2", 32, 4, 10, 64, "fp32", "cpu", 1, 3, 1, "none"),
    # a smaller one that runs the toggles in a few minutes: 128 wide, 6 deep, 2 -> 4, 64 tokens
    "cpu-tiny": Preset("SiT-T/2", 16, 4, 10, 64, "fp32", "cpu", 2, 5, 2, "all"),
    # the convergence benchmark's model: SiT-T/4 on Fashion-MNIST 1x32x32 (64 tokens), 2 -> 4
    "cpu-fmnist": Preset("SiT-T/4", 32, 1, 10, 64, "fp32", "cpu", 2, 5, 2, "none"),
    "gpu-b2": Preset("SiT-B/2", 32, 4, 1000, "auto", "bf16", "cuda", 3, 4, 3, "all"),
    "gpu-xl2": Preset("SiT-XL/2", 32, 4, 1000, "auto", "bf16", "cuda", 3, 3, 3, "all"),
    # the smallest thing that runs every code path, for checking the GPU script on a CPU
    "dry": Preset("SiT-T/2", 8, 4, 10, 4, "fp32", "cpu", 1, 1, 1, "all"),
}
BATCH_CANDIDATES = (256, 192, 128, 96, 64, 48, 32, 16, 8)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str = "sra"                   # "vanilla", "sra" or "teacher_only"
    truncate: bool = True
    teacher_precision: str = "autocast"
    teacher_fraction: float = 1.0
    ema_foreach: bool = True
    adam: str = "trainer"               # "trainer" (fused on CUDA, else foreach), "fused",
                                        # "foreach" or "default" (torch's choice, the released code)
    compile: str = ""                   # "": eager; "student"; "both" (what train.compile does)
    compile_mode: str = "default"       # torch.compile mode of the student
    micro_batches: int = 1              # forward/backward passes of `batch` images per optimizer step
                                        # (gradient accumulation, as train.micro_batch does)
    grad_checkpointing: bool = False
    sdpa: str | None = None             # None: PyTorch picks the attention kernel
    base: str | None = None             # the row a toggle is compared with


VANILLA = Variant("vanilla", kind="vanilla")
SRA_SELFALIGN = Variant("sra")
SRA_RELEASED = Variant("sra_released", truncate=False, teacher_precision="fp32", ema_foreach=False,
                       adam="default")
TEACHER_ONLY = Variant("teacher_only", kind="teacher_only")
BASE_ROWS = (VANILLA, SRA_SELFALIGN, SRA_RELEASED, TEACHER_ONLY)


def _toggle(source: Variant, name: str, **change) -> Variant:
    """``source`` with one thing changed, compared with ``source`` unless ``change`` names a ``base``."""
    return dataclasses.replace(source, name=name, **{"base": source.name, **change})


TOGGLES = {v.name: v for v in (
    _toggle(SRA_SELFALIGN, "sra_sdpa_math", sdpa="math"),
    _toggle(SRA_SELFALIGN, "sra_sdpa_flash", sdpa="flash"),
    _toggle(SRA_SELFALIGN, "sra_sdpa_efficient", sdpa="efficient"),
    _toggle(SRA_SELFALIGN, "sra_sdpa_cudnn", sdpa="cudnn"),
    _toggle(SRA_SELFALIGN, "sra_adam_fused", adam="fused"),
    _toggle(SRA_SELFALIGN, "sra_adam_foreach", adam="foreach"),
    _toggle(SRA_SELFALIGN, "sra_ema_loop", ema_foreach=False),
    _toggle(SRA_SELFALIGN, "sra_full_teacher", truncate=False),
    _toggle(SRA_SELFALIGN, "sra_teacher_fp32", teacher_precision="fp32"),
    _toggle(SRA_SELFALIGN, "sra_teacher_fp8", teacher_precision="fp8"),
    _toggle(TEACHER_ONLY, "teacher_only_fp8", teacher_precision="fp8"),
    _toggle(SRA_SELFALIGN, "sra_grad_checkpointing", grad_checkpointing=True),
    _toggle(SRA_SELFALIGN, "sra_teacher_fraction_0.5", teacher_fraction=0.5),
    # compiled rows last, in this order: vanilla first (the MFU target is vanilla's, and a
    # compile that overruns the budget then costs the SRA rows, not it); sra_compile compiles
    # the student with its tap and the teacher; the last two reuse those graphs
    _toggle(VANILLA, "vanilla_compile", compile="student"),
    # the paper's global batch on one card at twice the batch that fits: two micro-batches per
    # optimizer step halve the optimizer/EMA/clipping share (reuses vanilla_compile's graph)
    _toggle(VANILLA, "vanilla_compile_accum2", compile="student", micro_batches=2, base="vanilla_compile"),
    _toggle(SRA_SELFALIGN, "sra_compile", compile="both"),
    _toggle(SRA_SELFALIGN, "sra_compile_student", compile="student"),
    _toggle(TEACHER_ONLY, "teacher_only_compile", compile="both"),
    # fp8 teacher compiled (the quantisation fuses into the neighbouring kernels), vs sra_compile
    _toggle(SRA_SELFALIGN, "sra_compile_fp8", compile="both", teacher_precision="fp8", base="sra_compile"),
    _toggle(TEACHER_ONLY, "teacher_only_compile_fp8", compile="both", teacher_precision="fp8",
            base="teacher_only_compile"),
)}
# Rows only run when named (--toggles a,b): each costs minutes of compilation on a large model.
OPT_IN = {v.name: v for v in (
    # Triton GEMM templates autotuned against cuBLAS, epilogues fused into them: the MFU lever left
    # (CUDA graphs would save launch overhead, which is < 1 % of a 200+ ms XL/2 step)
    _toggle(VANILLA, "vanilla_compile_max_autotune", compile="student",
            compile_mode="max-autotune-no-cudagraphs", base="vanilla_compile"),
)}
ROWS = {v.name: v for v in (*BASE_ROWS, *TOGGLES.values(), *OPT_IN.values())}   # every row by name
NOT_DONE = {
    "cached_vs_online_vae": "measured by benchmarks/gpu/vae_encode.py (a separate script).",
}


def select_variants(spec: str) -> list[Variant]:
    if spec == "none":
        return list(BASE_ROWS)
    known = {name: v for name, v in ROWS.items() if v.base}     # the toggles: rows with a base
    names = list(TOGGLES) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown toggle(s) {unknown}: choose from {list(known)}, 'all' or 'none'")
    return list(BASE_ROWS) + [known[n] for n in names]
