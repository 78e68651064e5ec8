"""AdamW state between the released SRA code's parameter order and selfalign's trainer's.

The released ``train.py`` builds ``AdamW(model.parameters())``: its state is keyed by the index
in the model's ``state_dict`` order -- the root's ``pos_embed`` (a frozen ``nn.Parameter``, so
it never gets a state entry) first, then the embedders, the blocks, ``ap_head`` and the final
layer. selfalign's trainer builds ``AdamW`` over the trainable parameters of the backbone
(``pos_embed`` is a buffer here) followed by those of each regularizer; SRA's head is
``sra.head.{0,2}``. Every per-parameter slot (``step``, ``exp_avg``, ``exp_avg_sq``) moves
unchanged, so a round trip is exact.
"""
from __future__ import annotations

import torch

from ..models.backbone import BackboneConfig, DiffusionTransformer

HEAD_ORDER = ("ap_head.linear1.weight", "ap_head.linear1.bias", "ap_head.linear2.weight", "ap_head.linear2.bias")


def _backbone_names(cfg: BackboneConfig) -> tuple[list[str], set[str]]:
    """The backbone's state-dict names in order, and those of its trainable parameters."""
    with torch.device("meta"):
        model = DiffusionTransformer(cfg)
    return list(model.state_dict()), {n for n, p in model.named_parameters() if p.requires_grad}


def released_parameter_names(cfg: BackboneConfig) -> list[str]:
    """``model.parameters()`` order of the released SiT-SRA / DiT-SRA model (ap_head before the
    final layer, as the released modules register it)."""
    names, _ = _backbone_names(cfg)
    final = [n for n in names if n.startswith("final_layer.")]
    return [n for n in names if n not in final] + list(HEAD_ORDER) + final


def trainer_parameter_names(cfg: BackboneConfig, with_head: bool) -> list[str]:
    """selfalign's trainer's optimizer order (backbone, then the SRA head), in released names."""
    names, trainable = _backbone_names(cfg)
    return [n for n in names if n in trainable] + (list(HEAD_ORDER) if with_head else [])


def _shapes(cfg: BackboneConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in DiffusionTransformer(cfg).state_dict().items()}
    d = cfg.hidden_size
    return {**own, HEAD_ORDER[0]: (2 * d, d), HEAD_ORDER[1]: (2 * d,), HEAD_ORDER[2]: (d, 2 * d), HEAD_ORDER[3]: (d,)}


def _remap(optimizer: dict, source: list[str], target: list[str], shapes: dict) -> tuple[dict | None, str]:
    """``optimizer`` with its state moved from ``source``'s order to ``target``'s, or (None, why)."""
    groups, state = optimizer.get("param_groups"), optimizer.get("state")
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(state, dict):
        return None, "it is not a one-group torch optimizer state"
    if len(groups[0].get("params", ())) != len(source):
        return None, f"it holds {len(groups[0].get('params', ()))} parameters, the model {len(source)}"
    position = {name: i for i, name in enumerate(target)}
    moved = {}
    for index, slots in state.items():
        name = source[int(index)] if 0 <= int(index) < len(source) else None
        if name not in position:
            return None, f"parameter {index} ({name}) has a state but no place in the other order"
        for value in slots.values():
            if torch.is_tensor(value) and value.dim() and tuple(value.shape) != shapes[name]:
                return None, f"the state of {name} has shape {tuple(value.shape)}, the model needs {shapes[name]}"
        moved[position[name]] = slots
    group = {**groups[0], "params": list(range(len(target)))}
    return {"state": dict(sorted(moved.items())), "param_groups": [group]}, ""


def optimizer_to_selfalign(optimizer: dict, cfg: BackboneConfig, with_head: bool) -> tuple[dict | None, str]:
    """The released ``opt`` as selfalign's trainer's optimizer state (or None and why not)."""
    return _remap(optimizer, released_parameter_names(cfg), trainer_parameter_names(cfg, with_head), _shapes(cfg))


def optimizer_to_released(optimizer: dict, cfg: BackboneConfig, with_head: bool) -> tuple[dict | None, str]:
    """selfalign's trainer's optimizer state in the released ``opt`` layout (or None and why not)."""
    return _remap(optimizer, trainer_parameter_names(cfg, with_head), released_parameter_names(cfg), _shapes(cfg))


def fresh_optimizer(count: int, lr: float, betas, eps: float, weight_decay: float) -> dict:
    """An AdamW state with no moments yet, for ``count`` parameters (a checkpoint without ``opt``)."""
    params = [torch.zeros(1, requires_grad=True) for _ in range(count)]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay).state_dict()

