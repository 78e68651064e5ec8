"""Import released DiT / SiT / REPA / SRA checkpoints as selfalign runs, and export them back.

The tensor layouts are in :mod:`.convert_layouts`, the released arguments in
:mod:`.convert_args`, the optimizer state in :mod:`.convert_optimizer`. An import writes a
complete, resumable run directory: ``config.yaml`` from the checkpoint's ``args`` (where it has
them), one checkpoint at the released step (so the epoch-based SRA weight continues where the
authors' run stopped) with model, EMA, the SRA head and the AdamW moments. What selfalign's run
state has no place for -- the EMA's own ``ap_head``, the released ``args``, ``epoch`` and the
optimizer's group settings -- is kept beside it (``released.safetensors`` in the checkpoint,
``state.json["imported"]`` and the run's ``imported.json``), so exporting the imported checkpoint
gives back the official file tensor for tensor, and a checkpoint trained on from it keeps the
released run's arguments. Nothing is written in place: the run directory and the exported file appear
under their names only when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.experiment import VAE_DOWNSAMPLE, experiment_from_dict, save_config
from ..errors import CheckpointError, UsageError
from ..formats import checkpoint as ckpt_io
from ..models import backbone_config, parse_preset
from ..models.backbone import BackboneConfig, DiffusionTransformer
from ..regularizers import REGISTRY
from ..regularizers.sra import SRAConfig
from .convert_args import (DEFAULT_PROCESSES, IMAGENET_TRAIN_IMAGES, LOSS_TO_DISTANCE, RELEASED_ARGS,
                           args_to_config, config_to_args, sra_settings)
from .convert_layouts import (LAYOUTS, Released, check_layout, check_shapes, family_of, heads_to_original,
                              heads_to_selfalign, infer_dims, original_shapes, read_tensors, selfalign_to_sit,
                              sit_to_selfalign, split_checkpoint, time_reflection, zero_sra_head)
from .convert_optimizer import fresh_optimizer, optimizer_to_released, optimizer_to_selfalign, released_parameter_names

__all__ = ["Converted", "LAYOUTS", "import_state", "export_state", "import_checkpoint", "export_checkpoint",
           "experiment_for", "read_tensors", "time_reflection"]

SIDECAR = "released.safetensors"     # tensors of the released checkpoint selfalign's state has no place for
RECORD = "imported.json"             # in the run directory: what was imported, for later checkpoints' export
EMA_HEAD_PREFIX = "ema."
OUTPUT_SUFFIXES = (".pt", ".pth", ".safetensors")


@dataclass
class Converted:
    """selfalign-named state dicts of one checkpoint, the run it records, and what was done."""

    layout: str
    preset: str
    backbone: BackboneConfig
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    regularizers: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    notes: list[str] = field(default_factory=list)
    family: str = "SiT"
    optimizer: dict | None = None               # selfalign trainer's AdamW state, when ``opt`` maps
    ema_head: dict[str, torch.Tensor] = field(default_factory=dict)   # the EMA's ap_head, released names
    args: dict | None = None
    epoch: int | None = None


# -- import -----------------------------------------------------------------------------------------
def import_state(obj, layout: str, *, preset: str | None = None, input_size: int | None = None,
                 num_classes: int | None = None, in_channels: int | None = None,
                 keep_heads: bool = False, source: str = "checkpoint") -> Converted:
    """Check a released checkpoint against its layout and preset and convert it to selfalign names.
    ``sra`` always keeps its head (it is the SRA regularizer's); ``keep_heads`` keeps REPA's."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout {layout!r} is not one of {LAYOUTS}")
    released = split_checkpoint(obj, source)
    for state in (released.ema, released.model):
        check_layout(state, layout, source)
    family = family_of(released.ema, layout)
    size, patch, dims = infer_dims(released.ema)
    _check_final_width(released.ema, source)
    guessed = f"{family}-{size}/{patch}"
    preset = preset or guessed
    if parse_preset(preset)[0] != family:
        raise CheckpointError(f"preset {preset!r} is a {parse_preset(preset)[0]} model but {source} holds a "
                              f"{family} model (use {family}-...)")
    dims = {"input_size": input_size or dims["input_size"], "in_channels": in_channels or dims["in_channels"],
            "num_classes": num_classes or dims["num_classes"]}
    qk_norm = any(".attn.q_norm." in k for k in released.ema)
    cfg = backbone_config(preset, learn_sigma=family == "DiT", qk_norm=qk_norm, **dims)
    expected = original_shapes(cfg, layout)
    hint = "" if preset == guessed else f" (the checkpoint looks like {guessed}, input {dims['input_size']})"
    for name, state in (("ema", released.ema), ("model", released.model)):
        check_shapes(state, expected, layout, f"{source} ({layout} layout, {name} weights) vs "
                                              f"{preset} (input {cfg.input_size}, {cfg.in_channels} channels, "
                                              f"{cfg.num_classes} classes)", hint)
    converted = Converted(layout, preset, cfg, {}, {}, step=released.steps, family=family, args=released.args,
                          epoch=released.epoch)
    for name in ("model", "ema"):
        state = getattr(released, name)
        backbone = {k: v.float().contiguous() if v.is_floating_point() else v
                    for k, v in state.items() if k in expected}
        setattr(converted, name, sit_to_selfalign(backbone, cfg) if layout == "sit" else backbone)
    if released.model is released.ema:
        converted.notes.append("the file holds one state dict (a release's EMA weights): it serves as both the "
                               "model and the EMA")
    if layout == "sit":
        converted.notes.append("time direction converted (t -> 1 - t folded into t_embedder.mlp.0, velocity sign "
                               "and the discarded sigma half folded into final_layer.linear)")
    _import_heads(converted, released, expected, keep_heads)
    _import_optimizer(converted, released)
    return converted


def _check_final_width(state: dict[str, torch.Tensor], source: str) -> None:
    """The released SiT-S presets build a 768-wide final layer on 384-wide blocks (they omit
    ``decoder_hidden_size``); such a model cannot run, in the released code or here."""
    hidden = state["x_embedder.proj.weight"].shape[0]
    width = state.get("final_layer.adaLN_modulation.1.weight", torch.empty(0, hidden)).shape[1]
    if width != hidden:
        raise CheckpointError(f"{source}: its final layer is {width} wide but its blocks are {hidden} wide (the "
                              f"released SiT-S presets omit decoder_hidden_size={hidden}; their forward fails too): "
                              f"rebuild the model with decoder_hidden_size={hidden}")


def _import_heads(converted: Converted, released: Released, expected: dict, keep_heads: bool) -> None:
    layout = converted.layout
    dropped = sorted(k for k in released.model if k not in expected)
    if layout == "sra" or (dropped and keep_heads):
        converted.regularizers = heads_to_selfalign(released.model, layout)
        if layout == "sra":     # the EMA's own head: selfalign's run state has no place for it
            converted.ema_head = {k: v for k, v in released.ema.items() if k not in expected}
        if converted.regularizers:
            converted.notes.append(f"kept the {layout} head ({len(converted.regularizers)} tensors) as the "
                                   f"{layout} regularizer's" + (", and the EMA's own head beside it"
                                                               if converted.ema_head else ""))
        else:
            converted.notes.append("no ap_head in this checkpoint: imported without the SRA regularizer")
    elif dropped:
        converted.notes.append(f"dropped {len(dropped)} head tensors ({dropped[0].split('.')[0]}.*), "
                               f"unused for sampling")


def _import_optimizer(converted: Converted, released: Released) -> None:
    if released.optimizer is None:
        return
    if converted.layout != "sra" or not converted.regularizers:
        converted.notes.append(f"opt: not imported for the {converted.layout} layout (the optimizer starts afresh)")
        return
    converted.optimizer, why = optimizer_to_selfalign(released.optimizer, converted.backbone, with_head=True)
    if converted.optimizer is None:
        converted.notes.append(f"opt: not imported ({why}); the optimizer starts afresh")


def experiment_for(converted: Converted, data_path: str = "", processes: int = DEFAULT_PROCESSES):
    """The :class:`~selfalign.config.ExperimentConfig` of an imported checkpoint (latent ImageNet):
    the released ``args`` where the checkpoint has them (notes added to ``converted.notes``)."""
    cfg, family = converted.backbone, converted.family
    resolution = cfg.input_size * VAE_DOWNSAMPLE
    objective = {"kind": "ddpm", "learn_sigma": True} if family == "DiT" else {"kind": "flow"}
    regularizers = {}
    if converted.regularizers and converted.layout == "sra":
        loss = RELEASED_ARGS[family]["loss_type"] if family == "SiT" else "sml1"
        regularizers["sra"] = {**_paper_layers(converted.preset), "distance": LOSS_TO_DISTANCE[loss],
                               **sra_settings(family, converted.args, resolution)}
    elif converted.regularizers and converted.layout in REGISTRY:
        regularizers[converted.layout] = {"projector_dim": int(converted.regularizers["repa.projector.0.weight"].shape[0])}
    config = {
        "name": f"imported-{converted.layout}",
        "model": {"preset": converted.preset, "input_size": cfg.input_size, "in_channels": cfg.in_channels,
                  "num_classes": cfg.num_classes, "qk_norm": cfg.qk_norm},
        "objective": objective, "regularizers": regularizers,
        "data": {"kind": "latents", "resolution": resolution,
                 "path": data_path or f"(imported from a {converted.layout} checkpoint: set data.path)"},
        "train": {"betas": [0.9, 0.999]},
    }
    if converted.args is not None and converted.layout == "sra":
        converted.notes.extend(args_to_config(converted.args, family, config, processes))
    elif converted.args is not None:
        converted.notes.append(f"args: not read for the {converted.layout} layout (only the released SRA "
                               f"train.py's arguments are mapped)")
    elif "sra" in regularizers:
        sra = regularizers["sra"]
        converted.notes.append(f"no args in the checkpoint: SRA settings are the released {family} code's "
                               f"(distance {sra['distance']}, weight {sra['weight']} {sra['weight_schedule']}) with "
                               f"the paper's layers {sra['student_layer']}->{sra['teacher_layer']}; check them")
    return experiment_from_dict(config)


def _paper_layers(preset: str) -> dict:
    paper = SRAConfig.for_model(preset)
    return {"student_layer": paper.student_layer, "teacher_layer": paper.teacher_layer, "k_max": paper.k_max}


def import_checkpoint(source: str | Path, layout: str, run_dir: str | Path, *, data_path: str = "",
                      processes: int = DEFAULT_PROCESSES, **kwargs) -> tuple[Path, Converted]:
    """Convert a released checkpoint file into a new selfalign run directory; returns its checkpoint."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"{str(run_dir)!r} already exists and is not an empty folder; import into a new folder")
    converted = import_state(read_tensors(source), layout, source=str(source), **kwargs)
    config = experiment_for(converted, data_path, processes)
    # The tensors must load into the model the config describes.
    with torch.device("meta"):
        target = DiffusionTransformer(config.backbone_config())
    for name in ("model", "ema"):
        check_shapes(getattr(converted, name), {k: tuple(v.shape) for k, v in target.state_dict().items()},
                     "selfalign", f"converted {name} weights")
    images = converted.step * config.train.batch_size
    _note_epoch(converted, images)
    optimizer = converted.optimizer or fresh_optimizer(
        len([p for p in target.parameters() if p.requires_grad]) + len(converted.regularizers),
        config.train.lr, config.train.betas, config.train.eps, config.train.weight_decay)
    state = {"config": config.to_dict(), "images": images, "world_size": processes, "rng": [],
             "data": {"position": images, "seed": config.train.seed}, "nonfinite": {"skipped_steps": 0},
             "imported": {"source": str(Path(source).resolve()), "layout": layout, "family": converted.family,
                          "source_step": converted.step, "source_epoch": converted.epoch, "args": converted.args,
                          "processes": processes, "notes": converted.notes}}
    staging = run_dir.with_name(f".{run_dir.name}.importing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        save_config(config, staging / "config.yaml")
        ckpt = ckpt_io.save_checkpoint(staging, converted.step,
                                       {"model": converted.model, "ema": converted.ema,
                                        "regularizers": converted.regularizers},
                                       {"optimizer": optimizer, "scaler": {}}, _json_safe(state))
        if converted.ema_head:
            ckpt_io.write_tensors({EMA_HEAD_PREFIX + k: v for k, v in converted.ema_head.items()}, ckpt / SIDECAR)
        ckpt_io.write_text(json.dumps(_json_safe(state["imported"]), indent=1), staging / RECORD)
        if run_dir.is_dir():
            run_dir.rmdir()                 # empty (checked above); rename needs the name free
        os.rename(staging, run_dir)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write the run directory {str(run_dir)!r}: {err}") from None
    except BaseException:           # e.g. non-finite weights refused: no half-written run is left
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run_dir / ckpt_io.CHECKPOINT_DIR / ckpt.name, converted


def _note_epoch(converted: Converted, images: int) -> None:
    if converted.epoch is None:
        return
    epoch = images // IMAGENET_TRAIN_IMAGES
    if abs(epoch - converted.epoch) > 1:
        converted.notes.append(f"epoch {converted.epoch} in the checkpoint, but {converted.step} steps are "
                               f"{images:,} images, epoch {epoch} of ImageNet-1k: the released resume restarts its "
                               f"epoch counter; selfalign's epoch-based SRA weight follows the images seen")


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


# -- export -----------------------------------------------------------------------------------------
def export_state(model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                 regularizers: dict[str, torch.Tensor], cfg: BackboneConfig, layout: str,
                 ema_head: dict[str, torch.Tensor] | None = None) -> tuple[dict, list[str]]:
    """selfalign state dicts -> ``{"model": ..., "ema": ...}`` in a released layout (and notes).
    ``ema_head``: the EMA's own ``ap_head`` (released names), kept from an import."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout {layout!r} is not one of {LAYOUTS}")
    if layout != "sra" and cfg.learn_sigma != (layout == "dit"):
        raise CheckpointError(f"the {layout!r} layout needs learn_sigma={layout == 'dit'}, but this model has "
                              f"learn_sigma={cfg.learn_sigma}")
    notes = []
    heads = heads_to_original(regularizers, layout)
    ema_heads = dict(ema_head or {}) or dict(heads)
    if layout == "sra" and not heads:
        # SRA's models hold the head as a submodule and load strictly; it is unused for sampling.
        heads = ema_heads = zero_sra_head(cfg.hidden_size)
        notes.append("no SRA head in this checkpoint: wrote a zero ap_head (unused when sampling)")
    elif layout == "sra" and not ema_head:
        notes.append("selfalign keeps no EMA of the SRA head: the EMA gets the student's (the released EMA runs "
                     "in eval mode, which skips ap_head)")
    if layout == "repa" and not heads:
        notes.append("no REPA projector in this checkpoint: REPA's scripts must load it with strict=False")
    out = {}
    for name, state, head in (("model", model, heads), ("ema", ema, ema_heads)):
        state = {k: v.contiguous() for k, v in state.items()}
        out[name] = {**(selfalign_to_sit(state, cfg) if layout == "sit" else state), **head}
    if layout == "sra":     # the released state-dict order (ap_head registered before the final layer)
        order = released_parameter_names(cfg)
        out = {name: {k: state[k] for k in order} for name, state in out.items()}
    return out, notes


def export_checkpoint(checkpoint: str | Path, layout: str, out_file: str | Path, *, force: bool = False,
                      processes: int | None = None) -> tuple[Path, list[str]]:
    """Write a selfalign checkpoint (run or checkpoint directory) in a released layout.

    ``.pt``: ``{"model", "ema", "steps"}`` (what DiT/SiT/REPA scripts load, ``ema`` for sampling);
    for ``sra`` the released training checkpoint ``{"model", "ema", "opt", "args", "epoch", "steps"}``
    that ``train.py --resume-ckpt`` and ``generate.py`` load. ``.safetensors``: the EMA weights only.
    ``processes``: of the released run that continues it (its ``--batch-size`` is per process);
    default: the imported run's, else 8.
    """
    out_file = Path(out_file)
    if out_file.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"output {str(out_file)!r}: use a .pt or .safetensors file name")
    if out_file.exists() and not force:
        raise UsageError(f"output {str(out_file)!r} exists; pass --force to overwrite it")
    if not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not exist")
    ckpt = ckpt_io.resolve_checkpoint(checkpoint)
    state = ckpt_io.read_state(ckpt)
    config = experiment_from_dict(state["config"])
    tensors = {name: ckpt_io.load_tensors(ckpt, name) for name in ("model", "ema", "regularizers")}
    imported = state.get("imported") or _run_record(ckpt)
    sidecar = ckpt_io.load_tensors(ckpt, SIDECAR.split(".")[0]) if (ckpt / SIDECAR).is_file() else {}
    ema_head = {k[len(EMA_HEAD_PREFIX):]: v for k, v in sidecar.items() if k.startswith(EMA_HEAD_PREFIX)}
    out, notes = export_state(tensors["model"], tensors["ema"], tensors["regularizers"], config.backbone_config(),
                              layout, ema_head)
    step = int(state.get("step", 0))
    if out_file.suffix == ".safetensors":
        payload = out["ema"]
    elif layout == "sra":
        trained = {k.split(".")[0] for k in tensors["regularizers"]}
        payload, more = _released_training_checkpoint(out, ckpt, state, config, imported, trained, processes)
        notes += more
    else:
        payload = {**out, "steps": step}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:
        if out_file.suffix == ".safetensors":
            ckpt_io.write_tensors(payload, tmp)
        else:
            ckpt_io.write_torch(payload, tmp)
        tmp.replace(out_file)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {str(out_file)!r}: {err}") from None
    return out_file, notes


def _run_record(ckpt: Path) -> dict:
    """The import record of the run a checkpoint belongs to (checkpoints the trainer wrote later
    do not carry it), or {}."""
    path = ckpt.parent.parent / RECORD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); delete it to export with the released defaults") from None


def _released_training_checkpoint(out: dict, ckpt: Path, state: dict, config, imported: dict, trained: set,
                                  processes: int | None) -> tuple[dict, list[str]]:
    """``{"model", "ema", "opt", "args", "epoch", "steps"}`` as the released train.py writes it."""
    family = "DiT" if config.model.learn_sigma else "SiT"
    step = int(state.get("step", 0))
    from_sra = imported.get("layout") == "sra"
    is_import = from_sra and imported.get("source_step") == step
    base = imported.get("args") if from_sra else None
    processes = processes or (imported.get("processes") if from_sra else None) or DEFAULT_PROCESSES
    args, notes = config_to_args(_json_safe(config.to_dict()), family, base, processes)
    if is_import and imported.get("source_epoch") is not None:
        epoch = int(imported["source_epoch"])
    else:
        size = (state.get("data") or {}).get("dataset_size") or IMAGENET_TRAIN_IMAGES
        epoch = int(state.get("images", step * config.train.batch_size)) // size
    payload = {"model": out["model"], "ema": out["ema"]}
    saved = ckpt_io.load_optimizer_state(ckpt).get("optimizer")
    if trained - {"sra"}:
        notes.append(f"opt: not written (the run also trains {sorted(trained - {'sra'})}, which the released "
                     f"model has not); train.py --resume-ckpt needs it")
    elif saved and saved.get("param_groups"):
        opt, why = optimizer_to_released(saved, config.backbone_config(), with_head="sra" in trained)
        if opt is None:
            notes.append(f"opt: not written ({why})")
        else:
            payload["opt"] = opt
    payload.update({"args": argparse.Namespace(**args), "epoch": epoch, "steps": step})
    return payload, notes
