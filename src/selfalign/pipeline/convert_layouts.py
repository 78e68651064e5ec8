"""The tensors of released DiT / SiT / REPA / SRA checkpoints: reading, recognising, converting.

selfalign's backbone keeps the original DiT ``models.py`` parameter names (``pos_embed`` is a
buffer here, an ``nn.Parameter`` there: both are state-dict entries), so the layouts differ only in

==========  =====================================================================================
``dit``     facebookresearch/DiT: learned sigma (final layer ``2C`` channels); DDPM steps 0..999.
            Kept as is (selfalign's DiT presets learn sigma too).
``sit``     willisma/SiT: learn_sigma=True (its forward discards the second half of the output,
            which therefore never trains and stays zero) and the **opposite time direction**
            (t = 1 is data, velocity = data - noise). Converted exactly:
            ``model_selfalign(x, s) = -model_SiT(x, 1 - s)``. The ``1 - s`` is folded into the
            timestep MLP's first layer (the sin/cos embedding of ``1 - s`` is a per-frequency 2x2
            reflection ``M`` of the embedding of ``s``, so ``W' = W M``), the sign and the dropped
            sigma half into the final linear layer.
``repa``    sihyun-yu/REPA ``models/sit.py``: t = 0 is data as here, out = in channels, plus the
            projector heads ``projectors.<k>.{0,2,4}`` (dropped, or kept as ``repa.projector``).
``sra``     vvvvvjdy/SRA, both families: ``SiT-SRA`` as REPA (``C`` output channels, flow) and
            ``DiT-SRA`` as DiT (``2C``, DDPM), each plus the head ``ap_head.linear{1,2}``, kept as
            the SRA regularizer's ``sra.head.{0,2}``.
==========  =====================================================================================

Only tensors are ever read: ``.safetensors``, or ``torch.load(weights_only=True)`` (which refuses
pickled code; argparse ``Namespace`` -- the ``args`` entry of REPA/SRA training checkpoints -- is
the only non-tensor class allowed).
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..models.backbone import BackboneConfig, DiffusionTransformer
from ..models.presets import SIZES

LAYOUTS = ("sra", "repa", "sit", "dit")
HEAD_PATTERNS = {"sra": re.compile(r"^ap_head\.linear[12]\.(weight|bias)$"),
                 "repa": re.compile(r"^projectors\.\d+\.[024]\.(weight|bias)$")}
SRA_HEAD_NAMES = {"ap_head.linear1": "sra.head.0", "ap_head.linear2": "sra.head.2"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TIME_MLP = "t_embedder.mlp.0.weight"
FINAL = ("final_layer.linear.weight", "final_layer.linear.bias")
STEP_KEYS = ("steps", "step", "train_steps")


@dataclass
class Released:
    """What a released checkpoint file holds: the two state dicts and the run's record."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict | None = None       # ``opt``: a torch optimizer state dict
    args: dict | None = None            # ``args``: the training script's arguments
    epoch: int | None = None
    steps: int = 0


# -- reading tensors only ---------------------------------------------------------------------
def read_tensors(path: str | Path) -> dict:
    """A checkpoint's contents without unpickling anything but tensors and plain containers."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:     # safetensors raises its own error types for damaged files
            raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file ({err})") from None
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
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable PyTorch file ({first}); "
                              f"truncated?") from None


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


def _integer(value) -> int | None:
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def split_checkpoint(obj, source: str) -> Released:
    """A plain state dict (DiT/SiT releases: EMA weights) serves as both model and EMA; a
    training checkpoint has ``model`` and/or ``ema``, and maybe ``opt``, ``args``, ``epoch``, steps."""
    if _is_state_dict(obj):
        state = _strip_wrappers(obj)
        return Released(state, state)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {source!r} holds a {type(obj).__name__}, not a state dict")
    model, ema = obj.get("model"), obj.get("ema")
    for name, value in (("model", model), ("ema", ema)):
        if value is not None and not _is_state_dict(value):
            raise CheckpointError(f"checkpoint {source!r}: entry {name!r} is not a mapping of tensors")
    if model is None and ema is None:
        raise CheckpointError(f"checkpoint {source!r} holds no weights: expected tensors at the top level or "
                              f"under 'model'/'ema', found keys {sorted(map(str, obj))[:8]}")
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None
    optimizer = obj.get("opt") if isinstance(obj.get("opt"), dict) else None
    steps = next((_integer(obj[k]) for k in STEP_KEYS if _integer(obj.get(k)) is not None), 0)
    return Released(_strip_wrappers(model or ema), _strip_wrappers(ema or model), optimizer, args,
                    _integer(obj.get("epoch")), steps)


# -- shapes and families ----------------------------------------------------------------------
def infer_dims(state: dict[str, torch.Tensor]) -> tuple[str, int, dict]:
    """``("XL", 2, {input_size, in_channels, num_classes})`` from a state dict's shapes."""
    try:
        hidden, channels, patch, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[-2]
        classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    except (KeyError, ValueError):
        raise CheckpointError("cannot infer the model from this checkpoint (no x_embedder.proj.weight, pos_embed "
                              "or y_embedder.embedding_table.weight): is it a DiT/SiT checkpoint? pass "
                              "--preset") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    size = next((name for name, (d, n, _) in SIZES.items() if d == hidden and n == depth), None)
    if size is None:
        raise CheckpointError(f"no preset has width {hidden} and depth {depth} (see `selfalign models`)")
    return size, patch, {"input_size": math.isqrt(tokens) * patch, "in_channels": channels,
                         "num_classes": classes}


def output_channels(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(output channels, input channels)`` of a backbone state dict."""
    _, channels, patch, _ = state["x_embedder.proj.weight"].shape
    return state[FINAL[0]].shape[0] // (patch * patch), channels


def _sigma_rows(patch: int, channels: int) -> torch.Tensor:
    """Row mask of the learn-sigma final layer, (p, q, c) order with c fastest: True for c < C."""
    return (torch.arange(patch ** 2 * 2 * channels) % (2 * channels)) < channels


def _trained_halves(state: dict[str, torch.Tensor]) -> tuple[bool, bool] | None:
    """Whether the mean and the sigma half of a learn-sigma final layer hold any non-zero value
    (None for meta tensors, which carry no values)."""
    weight, bias = (state[k] for k in FINAL)
    if weight.is_meta:
        return None
    _, channels, patch, _ = state["x_embedder.proj.weight"].shape
    keep = _sigma_rows(patch, channels)
    used = lambda rows: bool(weight[rows].any() or bias[rows].any())   # noqa: E731
    return used(keep), used(~keep)


def recognise(state: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    """The layout a state dict's tensors show, and why: ``sra``/``repa`` by their heads, ``sit``
    (2C, unused zero sigma half) or ``dit`` (2C, trained sigma half); ``flow`` for a head-less
    C-channel SiT (REPA/SRA without heads), ``2c`` for a 2C model whose values cannot tell (an
    untrained or meta one); None without the tensors to tell (the shape check names what lacks)."""
    if any(HEAD_PATTERNS["sra"].match(k) for k in state):
        return "sra", "it holds ap_head (the SRA head)"
    if any(HEAD_PATTERNS["repa"].match(k) for k in state):
        return "repa", "it holds projectors.* (REPA's projector)"
    if FINAL[0] not in state or "x_embedder.proj.weight" not in state:
        return None, ""
    out, channels = output_channels(state)
    if out == channels:
        return "flow", (f"its final layer has {channels} output channels, a flow SiT of the REPA/SRA layout "
                        f"(t = 0 is data)")
    halves = _trained_halves(state)
    if halves == (True, False):
        return "sit", "the sigma half of its final layer is zero, as in the original SiT, which discards it"
    if halves is not None and halves[1]:
        return "dit", "the sigma half of its final layer is trained, as in a DiT with learned variance"
    return "2c", f"no head and {out} = 2 x {channels} output channels, as in an original DiT or SiT"


# Which recognised tensors each --from accepts, and what to say otherwise.
ACCEPTS = {"sra": ("sra", "flow", None), "repa": ("repa", "flow", None), "sit": ("sit", "2c", None),
           "dit": ("dit", "2c", None)}
ADVICE = {"sra": "--from sra", "repa": "--from repa", "sit": "--from sit", "dit": "--from dit",
          "flow": "--from sra (or --from repa)", "2c": "--from dit or --from sit"}


def check_layout(state: dict[str, torch.Tensor], layout: str, source: str) -> None:
    """Refuse, in one line, tensors of another layout than ``--from`` says."""
    seen, why = recognise(state)
    if seen not in ACCEPTS[layout]:
        raise CheckpointError(f"{source} does not look like a {layout!r} checkpoint: {why}; use {ADVICE[seen]}")


def family_of(state: dict[str, torch.Tensor], layout: str) -> str:
    """"SiT" or "DiT" for a checkpoint of a layout (the SRA release holds both families)."""
    if layout == "sra":
        out, channels = output_channels(state)
        return "DiT" if out == 2 * channels else "SiT"
    return "DiT" if layout == "dit" else "SiT"


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


def sit_to_selfalign(state: dict[str, torch.Tensor], cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """Original SiT (t = 1 data, learn_sigma) -> selfalign (t = 0 data, velocity noise - data)."""
    out = dict(state)
    keep = _sigma_rows(cfg.patch_size, cfg.in_channels)
    for key in FINAL:
        out[key] = -state[key][keep]
    _fold_time(out)
    return out


def selfalign_to_sit(state: dict[str, torch.Tensor], cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`sit_to_selfalign`; the sigma half (discarded by SiT) is zero."""
    out = dict(state)
    keep = _sigma_rows(cfg.patch_size, cfg.in_channels)
    for key in FINAL:
        full = torch.zeros((keep.numel(),) + state[key].shape[1:], dtype=state[key].dtype)
        full[keep] = -state[key]
        out[key] = full
    _fold_time(out)             # M is its own inverse
    return out


# -- heads ----------------------------------------------------------------------------------------
def _rename_modules(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in names:
            out[f"{names[module]}.{leaf}"] = value
    return out


def heads_to_selfalign(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A released checkpoint's head tensors under selfalign's regularizer names."""
    if layout == "sra":
        return _rename_modules(state, SRA_HEAD_NAMES)
    if layout != "repa":
        return {}
    indices = {k.split(".")[1] for k in state if k.startswith("projectors.")}
    if len(indices) > 1:
        raise CheckpointError(f"this REPA checkpoint has {len(indices)} projectors (several encoders); "
                              f"selfalign's repa regularizer has one: convert without --keep-heads")
    return _rename_modules(state, {f"projectors.{i}.{j}": f"repa.projector.{j}" for i in indices for j in (0, 2, 4)})


def heads_to_original(regularizers: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """selfalign's regularizer tensors under the released head names (others are left out)."""
    if layout == "sra":
        return _rename_modules(regularizers, {v: k for k, v in SRA_HEAD_NAMES.items()})
    if layout == "repa":
        return _rename_modules(regularizers, {f"repa.projector.{j}": f"projectors.0.{j}" for j in (0, 2, 4)})
    return {}


def zero_sra_head(hidden: int) -> dict[str, torch.Tensor]:
    """An all-zero ``ap_head`` (the released models hold the head and load strictly)."""
    return {"ap_head.linear1.weight": torch.zeros(2 * hidden, hidden), "ap_head.linear1.bias": torch.zeros(2 * hidden),
            "ap_head.linear2.weight": torch.zeros(hidden, 2 * hidden), "ap_head.linear2.bias": torch.zeros(hidden)}
