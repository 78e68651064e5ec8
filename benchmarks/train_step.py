"""Training-step benchmark: vanilla, SRA as selfalign runs it, SRA as the released recipe runs it.

Everything is measured in ONE process on one model with interleaved repeats (round r runs every
variant for a few steps, the next round in reverse order), so machine drift hits all rows alike.
A step is the trainer's own code: ``accumulate_gradients`` over ``TrainingStep`` (the generative
loss and every regularizer, backward) and ``OptimizerUpdate`` (clipping at 1.0, the finiteness
check, AdamW, EMA update).

Rows: ``vanilla``; ``sra`` (selfalign: teacher truncated at block n, same autocast as the student,
foreach EMA, fused AdamW); ``sra_released`` (the released SiT-SRA code's recipe, by flags: the
teacher's full forward in fp32 outside autocast with TF32 allowed, the per-parameter EMA loop,
torch's default AdamW); ``teacher_only`` (the EMA teacher's forward through blocks 1..n without
gradients). The floor of an SRA step is vanilla + teacher_only. Toggles change one thing of a
base row each (see ``TOGGLES`` in train_step_rows.py).

    PYTHONPATH=src python benchmarks/train_step.py --preset cpu-tiny
    PYTHONPATH=src python benchmarks/train_step.py --preset gpu-xl2 --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, matmul_tflops, summary, timed, write_json  # noqa: E402
from report import print_table  # noqa: E402
from train_step_report import analyse, table_rows  # noqa: E402
from train_step_rows import (BATCH_CANDIDATES, NOT_DONE, OPT_IN, PRESETS, ROWS,  # noqa: E402
                             SRA_RELEASED, SRA_SELFALIGN, TOGGLES, VANILLA, Preset, Variant, select_variants)

from selfalign.devices import pick_device  # noqa: E402
from selfalign.ema import EMA  # noqa: E402
from selfalign.models.flops import training_step_flops  # noqa: E402
from selfalign.models.presets import backbone_config  # noqa: E402
from selfalign.models.backbone import DiffusionTransformer  # noqa: E402
from selfalign.models.fp8 import float8_view, fp8_unavailable_reason  # noqa: E402
from selfalign.objectives import FlowObjective  # noqa: E402
from selfalign.regularizers.sra import SRA, SRAConfig, projection_head  # noqa: E402
from selfalign.training.step import TrainingStep, accumulate_gradients  # noqa: E402
from selfalign.training.update import OptimizerUpdate, adamw, adamw_kernel  # noqa: E402

LR, GRAD_CLIP = 1e-4, 1.0


def sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION"}
    return sdpa_kernel(getattr(SDPBackend, names[backend]))


class Bench:
    """One model, its EMA teacher and one SRA head shared by every row (their values don't
    change the timing), with optimizer updates and training steps built per row on first use."""

    def __init__(self, preset: Preset, device: torch.device):
        torch.manual_seed(0)
        self.device = device
        self.config = backbone_config(preset.model, input_size=preset.input_size,
                                      in_channels=preset.in_channels, num_classes=preset.num_classes)
        self.model = DiffusionTransformer(self.config).to(device).train()
        self.ema = EMA(self.model)
        self.sra_config = SRAConfig.for_model(preset.model)
        self.head = projection_head(self.config.hidden_size).to(device)
        self.params = list(self.model.parameters()) + list(self.head.parameters())
        self.objective = FlowObjective()
        if preset.precision == "bf16":
            self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        self.generator = torch.Generator(device).manual_seed(0)
        self.updates: dict[str, OptimizerUpdate] = {}
        self.steps: dict[tuple, TrainingStep] = {}
        self.compiled_students: dict[str, torch.nn.Module] = {}
        self.compiled_teachers: dict[str, torch.nn.Module] = {}
        self.fp8_teacher: torch.nn.Module | None = None
        self.batch = 0
        self.accumulated: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_batch(self, batch: int) -> None:
        self.batch = batch
        shape = (batch, self.config.in_channels, self.config.input_size, self.config.input_size)
        self.x0 = torch.randn(shape, device=self.device)
        self.y = torch.randint(0, self.config.num_classes, (batch,), device=self.device)
        self.accumulated = {1: (self.x0, self.y)}
        t = torch.rand(batch, device=self.device)   # teacher-only inputs, as SRA builds them
        t_teacher = self.objective.earlier_time(t, self.sra_config.k_max)
        self.x_teacher = self.objective.interpolate(self.x0, torch.randn_like(self.x0), t_teacher)
        self.t_teacher = self.objective.model_time(t_teacher)

    def adam_kind(self, kind: str) -> str:
        return adamw_kernel(self.device) if kind == "trainer" else kind

    def update(self, kind: str) -> OptimizerUpdate:
        """The trainer's optimizer update with AdamW kernel ``kind``, one per kernel."""
        kind = self.adam_kind(kind)
        if kind not in self.updates:
            optimizer = adamw(self.params, self.device, lr=LR, kernel=kind)
            self.updates[kind] = OptimizerUpdate(optimizer, self.ema, self.model, grad_clip=GRAD_CLIP)
        return self.updates[kind]

    def inputs(self, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch repeated ``micro_batches`` times: one optimizer step over that many micro-batches."""
        if micro_batches not in self.accumulated:
            self.accumulated[micro_batches] = (self.x0.repeat(micro_batches, 1, 1, 1), self.y.repeat(micro_batches))
        return self.accumulated[micro_batches]

    def teacher(self, precision: str) -> torch.nn.Module:
        """The EMA backbone, or (fp8 rows) its fp8 view over the same tensors, built once."""
        if precision != "fp8":
            return self.ema.model
        if self.fp8_teacher is None:
            self.fp8_teacher = float8_view(self.ema.model)
        return self.fp8_teacher

    def networks(self, v: Variant) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(student, teacher) of row ``v``: eager, or whole-model torch.compile with static shapes."""
        teacher = self.teacher(v.teacher_precision)
        if not v.compile:
            return self.model, teacher
        if v.compile_mode not in self.compiled_students:
            self.compiled_students[v.compile_mode] = torch.compile(self.model, dynamic=False, mode=v.compile_mode)
        student = self.compiled_students[v.compile_mode]
        if v.compile != "both":
            return student, teacher
        key = "fp8" if v.teacher_precision == "fp8" else "plain"
        if key not in self.compiled_teachers:
            self.compiled_teachers[key] = torch.compile(teacher, dynamic=False)
        return student, self.compiled_teachers[key]

    def training_step(self, v: Variant) -> TrainingStep:
        key = (v.kind, v.truncate, v.teacher_precision, v.teacher_fraction, bool(v.compile), v.compile_mode)
        if key not in self.steps:
            regularizers = {}
            if v.kind == "sra":
                config = dataclasses.replace(self.sra_config, teacher_truncate=v.truncate,
                                             teacher_precision=v.teacher_precision,
                                             teacher_fraction=v.teacher_fraction)
                sra = SRA(config, self.config)
                sra.head = self.head        # one head for every row
                regularizers["sra"] = sra
            student, _ = self.networks(v)
            self.steps[key] = TrainingStep(student, self.objective, regularizers)
        return self.steps[key]

    def run(self, v: Variant) -> None:
        """One step of row ``v`` (a whole training step, or the teacher-only forward).

        The functions ``Trainer.train_step`` runs: forward and backward over the micro-batches,
        then the optimizer update (global-norm clipping, one host sync on the finiteness of loss
        and norm, AdamW, EMA). The released code syncs as often: it logs ``loss.item()`` every step.
        """
        _, teacher = self.networks(v)
        if v.kind == "teacher_only":
            with torch.no_grad(), sdpa_context(v.sdpa), self.autocast():
                teacher(self.x_teacher, self.t_teacher, self.y, taps=[self.sra_config.teacher_layer],
                        features_only=True)
            return
        step, update = self.training_step(v), self.update(v.adam)
        x0, y = self.inputs(v.micro_batches)
        self.model.config.grad_checkpointing = v.grad_checkpointing
        self.ema.foreach = v.ema_foreach
        try:
            with sdpa_context(v.sdpa):
                terms = accumulate_gradients(step, x0, y, self.batch, update.backward,
                                             teacher=teacher if v.kind == "sra" else None,
                                             generator=self.generator, autocast=self.autocast)
            if not update(terms["loss"]).applied:
                raise FloatingPointError("non-finite loss or gradient norm")
        finally:
            self.model.config.grad_checkpointing = False

    def same_as_base(self, v: Variant) -> bool:
        """A toggle that changes nothing here (fused AdamW is already the trainer's on CUDA)."""
        if v.base is None:
            return False
        base = ROWS[v.base]
        plain = lambda x: dataclasses.replace(x, name="", base=None, adam=self.adam_kind(x.adam))
        return plain(v) == plain(base)

    def images_per_step(self, v: Variant) -> int:
        return self.batch * v.micro_batches

    def flops_per_step(self, v: Variant) -> float:
        """Useful model FLOPs of one step of ``v`` for all its images (see selfalign.models.flops)."""
        n = self.sra_config.teacher_layer
        if v.kind == "teacher_only":
            return self.batch * training_step_flops(self.config, teacher_layer=n)["teacher"]
        layer = n if v.kind == "sra" else None
        return self.images_per_step(v) * training_step_flops(self.config, teacher_layer=layer,
                                                             teacher_fraction=v.teacher_fraction)["total"]

    def cleanup(self) -> None:
        for update in self.updates.values():
            update.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def fit_batch(bench: Bench, candidates) -> tuple[int, list]:
    """The largest batch at which both SRA rows run with 10 % of the card's memory to spare."""
    total = torch.cuda.get_device_properties(bench.device).total_memory
    tried = []
    for batch in candidates:
        bench.set_batch(batch)
        torch.cuda.reset_peak_memory_stats(bench.device)
        try:
            for v in (SRA_SELFALIGN, SRA_RELEASED, VANILLA):
                bench.run(v)
            torch.cuda.synchronize(bench.device)
            peak = torch.cuda.max_memory_allocated(bench.device)
            tried.append({"batch": batch, "peak_gib": round(peak / 2**30, 2)})
            if peak < 0.9 * total:
                return batch, tried
        except torch.cuda.OutOfMemoryError:
            tried.append({"batch": batch, "error": "out of memory"})
        bench.cleanup()
    raise SystemExit(f"no batch in {candidates} fits on {torch.cuda.get_device_name(bench.device)}")


def measure(bench: Bench, variants: list[Variant], preset: Preset, deadline: float,
            compile_reserve_s: float = 0.0) -> dict:
    """Warm every row up, then interleaved rounds; returns per-row samples and status.

    A compiled row's warm-up (compilation) starts only with ``compile_reserve_s`` of budget left.
    """
    cuda = bench.device.type == "cuda"
    rows = {v.name: {"variant": dataclasses.asdict(v), "samples": [], "status": "ok",
                     "peak_gib": None, "step_gib": None} for v in variants}
    active = []
    fp8_missing = fp8_unavailable_reason(bench.device)
    for v in variants:
        if time.monotonic() + (compile_reserve_s if v.compile else 0.0) > deadline:
            rows[v.name]["status"] = "skipped: not enough time budget left for its warm-up"
            continue
        if v.teacher_precision == "fp8" and fp8_missing:
            rows[v.name]["status"] = f"skipped: {fp8_missing}"
            continue
        try:
            first = timed(lambda: bench.run(v), bench.device)
            for _ in range(preset.warmup - 1):
                bench.run(v)
            rows[v.name]["first_step_s"] = round(first, 3)   # includes compilation
            active.append(v)
        except Exception as err:   # one toggle an old card or CPU lacks must not end the run
            rows[v.name]["status"] = "failed: " + error_line(err)
        if rows[v.name]["status"] != "ok":
            bench.cleanup()        # outside the except: the traceback no longer pins tensors
    for r in range(preset.repeats):
        for v in (active if r % 2 == 0 else active[::-1]):
            if rows[v.name]["status"] != "ok":
                continue
            if time.monotonic() > deadline:
                rows[v.name].setdefault("note", "time budget ran out: fewer rounds than asked")
                continue
            if cuda:
                torch.cuda.synchronize(bench.device)
                start_mem = torch.cuda.memory_allocated(bench.device)
                torch.cuda.reset_peak_memory_stats(bench.device)
            try:
                for _ in range(preset.steps):
                    rows[v.name]["samples"].append(timed(lambda: bench.run(v), bench.device))
            except Exception as err:
                rows[v.name]["status"] = "failed: " + error_line(err)
            if rows[v.name]["status"] != "ok":
                bench.cleanup()
                continue
            if cuda:
                peak = torch.cuda.max_memory_allocated(bench.device)
                rows[v.name]["peak_gib"] = max(rows[v.name]["peak_gib"] or 0, peak / 2**30)
                rows[v.name]["step_gib"] = max(rows[v.name]["step_gib"] or 0, (peak - start_mem) / 2**30)
    for v in variants:
        row = rows[v.name]
        row.update(summary(row["samples"]))
        row["samples_ms"] = [round(s * 1e3, 3) for s in row.pop("samples")]
        if row.get("median_ms"):
            row["images_per_s"] = bench.images_per_step(v) / (row["median_ms"] / 1e3)
            row["model_tflops_per_step"] = bench.flops_per_step(v) / 1e12
            row["achieved_tflops"] = row["model_tflops_per_step"] / (row["median_ms"] / 1e3)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--batch", default=None, help="an integer or 'auto' (default: the preset's)")
    parser.add_argument("--max-batch", type=int, default=256, help="largest batch 'auto' tries")
    parser.add_argument("--toggles", default=None, help="'all', 'none' or a comma list of " + ", ".join(TOGGLES)
                        + "; only by name: " + ", ".join(OPT_IN))
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new work after this")
    parser.add_argument("--compile-reserve-s", type=float, default=90.0,
                        help="with --budget-s: compiled rows start only with this much budget left")
    parser.add_argument("--device", default=None, help="override the preset's device")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--out", default=None, help="JSON file or folder (default benchmarks/results/)")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, **{k: getattr(args, k) for k in ("repeats", "steps", "warmup", "toggles")
                                            if getattr(args, k) is not None})
    device = pick_device(args.device or preset.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    deadline = started + args.budget_s if args.budget_s else float("inf")
    # The released script sets these at import; they only affect fp32 matmuls (its teacher).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    env = environment(device)
    dtype = torch.bfloat16 if preset.precision == "bf16" else torch.float32
    rate = matmul_tflops(device, dtype)
    bench = Bench(preset, device)
    batch_search = None
    batch = args.batch or preset.batch
    if batch == "auto":
        if device.type != "cuda":
            raise SystemExit("--batch auto needs a GPU; give an integer batch on CPU")
        batch, batch_search = fit_batch(bench, [b for b in BATCH_CANDIDATES if b <= args.max_batch])
    bench.set_batch(int(batch))
    variants = [v for v in select_variants(preset.toggles)
                if not (args.no_compile and v.compile) and not bench.same_as_base(v)]
    result = {
        "benchmark": "train_step",
        "environment": env,
        "settings": {"preset": args.preset, **dataclasses.asdict(preset), "batch": bench.batch,
                     "batch_search": batch_search, "tokens": bench.config.num_tokens,
                     "hidden_size": bench.config.hidden_size, "depth": bench.config.depth,
                     "sra_layers": [bench.sra_config.student_layer, bench.sra_config.teacher_layer],
                     "parameters_m": sum(p.numel() for p in bench.model.parameters()) / 1e6,
                     "tf32_for_fp32_matmuls": True, "lr": LR, "grad_clip": GRAD_CLIP,
                     "command": " ".join(sys.argv)},
        "matmul_rate": rate,
        "rows": {},
        "not_done": NOT_DONE,
    }
    slug = env["device"].split("(")[0].strip().replace(" ", "-").replace("/", "-")[:40]
    # Eager rows first, written out before any compilation starts: a compile that overruns the
    # hard time limit then loses only the compiled rows.
    for phase in ([v for v in variants if not v.compile], [v for v in variants if v.compile]):
        if not phase:
            continue
        result["rows"].update(measure(bench, phase, preset, deadline, args.compile_reserve_s))
        result["wall_s"] = round(time.monotonic() - started, 1)
        result["analysis"] = analyse(result, bench.config, bench.sra_config.teacher_layer)
        path = write_json(result, args.out, f"train_step_{args.preset}_{slug}.json")
    header, table = table_rows(result)
    print(f"\n{args.preset}: {bench.config.num_tokens} tokens, batch {bench.batch}, {env['device']}, "
          f"load {env['load_average_start'][0]:.2f}")
    print_table(table, header)
    for line in result["analysis"]["lines"]:
        print(line)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
