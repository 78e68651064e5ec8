"""Import released DiT / SiT / REPA / SRA checkpoints as selfalign checkpoints, and export back.

selfalign's backbone keeps the original DiT ``models.py`` parameter names (``pos_embed`` is a
buffer here, an ``nn.Parameter`` there: both are state-dict entries), so the layouts differ only in

==========  =====================================================================================
``dit``     facebookresearch/DiT: learned sigma (final layer ``2C`` channels); DDPM steps 0..999.
            Kept as is (selfalign's DiT presets learn sigma too).
``sit``     willisma/SiT: learn_sigma=True (its forward discards the second half of the output)
            and the **opposite time direction** (t = 1 is data, velocity = data - noise).
            Converted exactly: ``model_selfalign(x, s) = -model_SiT(x, 1 - s)``. The ``1 - s`` is
            folded into the timestep MLP's first layer (the sin/cos embedding of ``1 - s`` is a
            per-frequency 2x2 reflection ``M`` of the embedding of ``s``, so ``W' = W M``), the sign
            and the dropped sigma half into the final linear layer.
``repa``    sihyun-yu/REPA ``models/sit.py``: t = 0 is data as here, out = in channels, plus the
            projector heads ``projectors.<k>.{0,2,4}`` (dropped, or kept as ``repa.projector``).
``sra``     vvvvvjdy/SRA ``SiT-SRA/models/sit.py``: as REPA, plus the head ``ap_head.linear{1,2}``
            (dropped, or kept as ``sra.head.{0,2}``).
==========  =====================================================================================

Only tensors are ever read: ``.safetensors``, or ``torch.load(weights_only=True)`` (which refuses
pickled code; argparse ``Namespace`` -- the ``args`` entry of REPA/SRA training checkpoints -- is
the only non-tensor class allowed). A checkpoint whose names or shapes do not fit the preset is
refused with a message naming the first mismatch.
"""
from __future__ import annotations

import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models import backbone_config, parse_preset
from ..models.backbone import BackboneConfig, DiffusionTransformer
from ..models.presets import SIZES

LAYOUTS = ("sra", "repa", "sit", "dit")
FAMILY = {"sra": "SiT", "repa": "SiT", "sit": "SiT", "dit": "DiT"}
HEAD_PATTERNS = {"sra": re.compile(r"^ap_head\.linear[12]\.(weight|bias)$"),
                 "repa": re.compile(r"^projectors\.\d+\.[024]\.(weight|bias)$")}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TIME_MLP = "t_embedder.mlp.0.weight"
FINAL = ("final_layer.linear.weight", "final_layer.linear.bias")


@dataclass
class Converted:
    """selfalign-named state dicts of one checkpoint and what was done to get them."""

    layout: str
    preset: str
    backbone: BackboneConfig
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    regularizers: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    notes: list[str] = field(default_factory=list)


# -- reading tensors only ---------------------------------------------------------------------
def read_tensors(path: str | Path) -> dict:
    """A checkpoint's contents without unpickling anything but tensors and plain containers."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:
            raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file ({err})") from None
    import argparse
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [l.strip() for l in str(err).splitlines() if l.strip()]
        why = next((l for l in lines if "global" in l.lower()), lines[0] if lines else "")
        raise CheckpointError(f"checkpoint {str(path)!r} was refused: it holds pickled objects other than tensors "
                              f"({why[:160]}); selfalign never unpickles code -- re-save it as tensors only, e.g. "
                              f"torch.save({{'ema': state_dict}}, path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {str(path)!r} is not a readable PyTorch file ({first}); truncated?") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:     # DDP / torch.compile wrappers
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def split_checkpoint(obj, path: str | Path) -> tuple[dict, dict, int]:
    """``(model, ema, step)`` state dicts: a plain state dict (DiT/SiT releases: EMA weights)
    serves as both; a training checkpoint has ``model`` and/or ``ema``."""
    if _is_state_dict(obj):
        state = _strip_wrappers(obj)
        return state, state, 0
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    model, ema = obj.get("model"), obj.get("ema")
    for name, value in (("model", model), ("ema", ema)):
        if value is not None and not _is_state_dict(value):
            raise ValueError(f"checkpoint {str(path)!r}: entry {name!r} is not a mapping of tensors")
    if model is None and ema is None:
        raise ValueError(f"checkpoint {str(path)!r} holds no weights: expected tensors at the top level or "
                         f"under 'model'/'ema', found keys {sorted(map(str, obj))[:8]}")
    model, ema = _strip_wrappers(model or ema), _strip_wrappers(ema or model)
    step = next((int(obj[k]) for k in ("steps", "step", "train_steps")
                 if isinstance(obj.get(k), (int, float)) and not isinstance(obj.get(k), bool)), 0)
    return model, ema, step


# -- shapes -----------------------------------------------------------------------------------
def infer_preset(state: dict[str, torch.Tensor], layout: str) -> tuple[str, dict]:
    """Guess ``("SiT-XL/2", {input_size, in_channels, num_classes})`` from a state dict's shapes."""
    try:
        hidden, channels, patch, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[-2]
        classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    except (KeyError, ValueError):
        raise ValueError("cannot infer the model from this checkpoint (no x_embedder.proj.weight, pos_embed "
                         "or y_embedder.embedding_table.weight): is it a DiT/SiT checkpoint? pass --preset") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    size = next((name for name, (d, n, _) in SIZES.items() if d == hidden and n == depth), None)
    if size is None:
        raise ValueError(f"no preset has width {hidden} and depth {depth} (see `selfalign models`)")
    grid = math.isqrt(tokens)
    return f"{FAMILY[layout]}-{size}/{patch}", {"input_size": grid * patch, "in_channels": channels,
                                                "num_classes": classes}


def _describe(preset: str, cfg: BackboneConfig) -> str:
    return f"{preset} (input {cfg.input_size}, {cfg.in_channels} channels, {cfg.num_classes} classes)"


def original_shapes(cfg: BackboneConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the original code's state dict for a backbone (heads excluded)."""
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in DiffusionTransformer(cfg).state_dict().items()}
    if layout == "sit":     # learn_sigma=True: the final layer has twice the channels
        own[FINAL[0]] = (2 * own[FINAL[0]][0], own[FINAL[0]][1])
        own[FINAL[1]] = (2 * own[FINAL[1]][0],)
    return own


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], layout: str,
                 what: str, hint: str = "") -> None:
    """Refuse with the first missing, misshapen or unexpected tensor (heads aside)."""
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(f"{what} does not fit: it lacks {key!r}{hint}")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{what} does not fit: {key!r} has shape {tuple(state[key].shape)}, the preset "
                                  f"needs {shape}{hint}")
    head = HEAD_PATTERNS.get(layout)
    extra = sorted(k for k in state if k not in expected and not (head and head.match(k)))
    if extra:
        raise CheckpointError(f"{what} does not fit: unexpected tensor {extra[0]!r}{hint}")


# -- the time-direction conversion ---------------------------------------------------------------
def time_reflection(frequency_size: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """``M`` with ``emb(1 - t) = M @ emb(t)`` for the backbone's ``[cos(f t), sin(f t)]`` embedding.

    ``cos(f(1-t)) = cos f cos ft + sin f sin ft`` and ``sin(f(1-t)) = sin f cos ft - cos f sin ft``.
    The frequencies are computed exactly as the embedder does (float32), so only the final
    rounding of ``W @ M`` differs from evaluating the original at ``1 - t``. ``M @ M = I``.
    """
    half = frequency_size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).double()
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    m = torch.zeros(frequency_size, frequency_size, dtype=torch.float64)
    idx = torch.arange(half)
    m[idx, idx], m[idx, idx + half] = cos, sin
    m[idx + half, idx], m[idx + half, idx + half] = sin, -cos
    if frequency_size % 2:      # the zero padding column of an odd embedding stays zero
        m[-1, -1] = 1.0
    return m


def _fold_time(state: dict[str, torch.Tensor]) -> None:
    w = state[TIME_MLP]
    state[TIME_MLP] = (w.double() @ time_reflection(w.shape[1])).to(w.dtype)


def _sigma_rows(cfg: BackboneConfig) -> torch.Tensor:
    """Row mask of the learn-sigma final layer, (p, q, c) order with c fastest: True for c < C."""
    c = cfg.in_channels
    return (torch.arange(cfg.patch_size ** 2 * 2 * c) % (2 * c)) < c


def sit_to_selfalign(state: dict[str, torch.Tensor], cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """Original SiT (t = 1 data, learn_sigma) -> selfalign (t = 0 data, velocity noise - data)."""
    out = dict(state)
    keep = _sigma_rows(cfg)
    for key in FINAL:
        out[key] = -state[key][keep]
    _fold_time(out)
    return out


def selfalign_to_sit(state: dict[str, torch.Tensor], cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`sit_to_selfalign`; the sigma half (discarded by SiT) is zero."""
    out = dict(state)
    keep = _sigma_rows(cfg)
    for key in FINAL:
        full = torch.zeros((keep.numel(),) + state[key].shape[1:], dtype=state[key].dtype)
        full[keep] = -state[key]
        out[key] = full
    _fold_time(out)             # M is its own inverse
    return out


# -- heads ----------------------------------------------------------------------------------------
def _heads_to_selfalign(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "sra":
        names = {"ap_head.linear1": "sra.head.0", "ap_head.linear2": "sra.head.2"}
    elif layout == "repa":
        indices = {k.split(".")[1] for k in state if k.startswith("projectors.")}
        if len(indices) > 1:
            raise ValueError(f"this REPA checkpoint has {len(indices)} projectors (several encoders); "
                             f"selfalign's repa regularizer has one: convert without --keep-heads")
        names = {f"projectors.{i}.{j}": f"repa.projector.{j}" for i in indices for j in (0, 2, 4)}
    else:
        return {}
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in names:
            out[f"{names[module]}.{leaf}"] = value
    return out


def _heads_to_original(regularizers: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "sra":
        names = {"sra.head.0": "ap_head.linear1", "sra.head.2": "ap_head.linear2"}
    elif layout == "repa":
        names = {f"repa.projector.{j}": f"projectors.0.{j}" for j in (0, 2, 4)}
    else:
        return {}
    return {f"{names[m]}.{leaf}": v for k, v in regularizers.items()
            for m, _, leaf in [k.rpartition(".")] if m in names}


# -- import / export --------------------------------------------------------------------------------
def import_state(obj, layout: str, *, preset: str | None = None, input_size: int | None = None,
                 num_classes: int | None = None, in_channels: int | None = None,
                 keep_heads: bool = False, source: str = "checkpoint") -> Converted:
    """Check a released checkpoint against its layout and preset and convert it to selfalign names."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    model_sd, ema_sd, step = split_checkpoint(obj, source)
    guessed, dims = infer_preset(ema_sd, layout)
    preset = preset or guessed
    family, _, _ = parse_preset(preset)
    if family != FAMILY[layout]:
        raise ValueError(f"preset {preset!r} is a {family} model but the {layout!r} layout holds "
                         f"{FAMILY[layout]} models (use {FAMILY[layout]}-...)")
    dims = {"input_size": input_size or dims["input_size"], "in_channels": in_channels or dims["in_channels"],
            "num_classes": num_classes or dims["num_classes"]}
    cfg = backbone_config(preset, learn_sigma=layout == "dit", **dims)
    expected = original_shapes(cfg, layout)
    hint = "" if preset == guessed else f" (the checkpoint looks like {guessed}, input {dims['input_size']})"
    for name, state in (("ema", ema_sd), ("model", model_sd)):
        check_shapes(state, expected, layout, f"{source} ({layout} layout, {name} weights) vs "
                                              f"{_describe(preset, cfg)}", hint)
    notes = []
    converted = {}
    for name, state in (("model", model_sd), ("ema", ema_sd)):
        backbone = {k: v.float().contiguous() if v.is_floating_point() else v
                    for k, v in state.items() if k in expected}
        converted[name] = sit_to_selfalign(backbone, cfg) if layout == "sit" else backbone
    if layout == "sit":
        notes.append("time direction converted (t -> 1 - t folded into t_embedder.mlp.0, velocity sign "
                     "and the discarded sigma half folded into final_layer.linear)")
    regularizers = {}
    dropped = sorted(k for k in model_sd if k not in expected)
    if dropped and keep_heads:
        regularizers = _heads_to_selfalign(model_sd, layout)
        notes.append(f"kept the {layout} head ({len(regularizers)} tensors) as regularizer weights")
    elif dropped:
        notes.append(f"dropped {len(dropped)} head tensors ({dropped[0].split('.')[0]}.*), unused for sampling")
    return Converted(layout, preset, cfg, converted["model"], converted["ema"], regularizers, step, notes)


def export_state(model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                 regularizers: dict[str, torch.Tensor], cfg: BackboneConfig, layout: str) -> tuple[dict, list[str]]:
    """selfalign state dicts -> ``{"model": ..., "ema": ...}`` in a released layout (and notes)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    wants_sigma = layout == "dit"
    if cfg.learn_sigma != wants_sigma:
        raise ValueError(f"the {layout!r} layout needs learn_sigma={wants_sigma}, but this model has "
                         f"learn_sigma={cfg.learn_sigma}")
    notes = []
    heads = _heads_to_original(regularizers, layout)
    if layout == "sra" and not heads:
        # SRA's model has the head as a submodule and loads strictly; it is unused for sampling.
        d = cfg.hidden_size
        heads = {"ap_head.linear1.weight": torch.zeros(2 * d, d), "ap_head.linear1.bias": torch.zeros(2 * d),
                 "ap_head.linear2.weight": torch.zeros(d, 2 * d), "ap_head.linear2.bias": torch.zeros(d)}
        notes.append("no SRA head in this checkpoint: wrote a zero ap_head (unused when sampling)")
    if layout == "repa" and not heads:
        notes.append("no REPA projector in this checkpoint: REPA's scripts must load it with strict=False")
    out = {}
    for name, state in (("model", model), ("ema", ema)):
        state = {k: v.contiguous() for k, v in state.items()}
        out[name] = {**(selfalign_to_sit(state, cfg) if layout == "sit" else state), **heads}
    return out, notes


def experiment_for(converted: Converted, data_path: str = "") -> "ExperimentConfig":  # noqa: F821
    """The :class:`~selfalign.config.ExperimentConfig` of an imported checkpoint (latent ImageNet)."""
    from ..config.experiment import VAE_DOWNSAMPLE, experiment_from_dict
    from ..regularizers import REGISTRY
    cfg = converted.backbone
    objective = {"kind": "ddpm", "learn_sigma": True} if converted.layout == "dit" else {"kind": "flow"}
    regularizers = {}
    if converted.regularizers:
        name = converted.layout
        settings = {}
        if name == "repa":
            settings["projector_dim"] = int(converted.regularizers["repa.projector.0.weight"].shape[0])
        if name in REGISTRY:
            regularizers[name] = settings
    return experiment_from_dict({
        "name": f"imported-{converted.layout}",
        "model": {"preset": converted.preset, "input_size": cfg.input_size, "in_channels": cfg.in_channels,
                  "num_classes": cfg.num_classes},
        "objective": objective, "regularizers": regularizers,
        "data": {"kind": "latents", "resolution": cfg.input_size * VAE_DOWNSAMPLE,
                 "path": data_path or f"(imported from a {converted.layout} checkpoint: set data.path)"},
    })


def import_checkpoint(source: str | Path, layout: str, run_dir: str | Path, *, data_path: str = "",
                      **kwargs) -> tuple[Path, Converted]:
    """Convert a released checkpoint file into a selfalign run directory; returns its checkpoint."""
    from ..config.experiment import save_config
    from ..formats import checkpoint as ckpt_io

    converted = import_state(read_tensors(source), layout, source=str(source), **kwargs)
    config = experiment_for(converted, data_path)
    # The tensors must load into the model the config describes (and be finite).
    with torch.device("meta"):
        target = DiffusionTransformer(config.backbone_config())
    for name in ("model", "ema"):
        check_shapes(getattr(converted, name), {k: tuple(v.shape) for k, v in target.state_dict().items()},
                     "selfalign", f"converted {name} weights")
    run_dir = Path(run_dir)
    if ckpt_io.list_checkpoints(run_dir):
        raise ValueError(f"{str(run_dir)!r} already holds checkpoints; import into a new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    state = {"config": config.to_dict(), "images": 0,
             "imported": {"source": str(Path(source).resolve()), "layout": layout,
                          "source_step": converted.step, "notes": converted.notes}}
    path = ckpt_io.save_checkpoint(run_dir, converted.step, {"model": converted.model, "ema": converted.ema,
                                                             "regularizers": converted.regularizers},
                                   {}, json_safe(state))
    return path, converted


def json_safe(obj):
    import json
    return json.loads(json.dumps(obj, default=list))


def export_checkpoint(checkpoint: str | Path, layout: str, out_file: str | Path) -> tuple[Path, list[str]]:
    """Write a selfalign checkpoint (run or checkpoint directory) in a released layout.

    ``.pt``: ``{"model": ..., "ema": ...}`` tensors (what DiT/SiT/REPA/SRA scripts load, ``ema``
    for sampling); ``.safetensors``: the EMA weights only.
    """
    from ..config.experiment import experiment_from_dict
    from ..formats import checkpoint as ckpt_io

    ckpt = ckpt_io.resolve_checkpoint(checkpoint)
    config = experiment_from_dict(ckpt_io.read_state(ckpt)["config"])
    tensors = {name: ckpt_io.load_tensors(ckpt, name) for name in ("model", "ema", "regularizers")}
    out, notes = export_state(tensors["model"], tensors["ema"], tensors["regularizers"],
                              config.backbone_config(), layout)
    out_file = Path(out_file)
    if out_file.suffix not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"output {str(out_file)!r}: use a .pt or .safetensors file name")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    if out_file.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(out["ema"], str(tmp))
    else:
        torch.save({**out, "steps": int(ckpt_io.read_state(ckpt).get("step", 0))}, tmp)
    tmp.replace(out_file)
    return out_file, notes
