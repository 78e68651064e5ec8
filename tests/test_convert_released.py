"""Interop with the released SRA code, pinned by a manifest derived from the released source
(tests/data/sra_layouts.json), not by selfalign's own export: SiT-SRA and DiT-SRA checkpoints of
the manifest's layouts import (family, config from args, step, optimizer), compute what the
released forward computes, and export back to the official file tensor for tensor."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfalign.cli import main
from selfalign.errors import CheckpointError
from selfalign.formats import checkpoint as ckpt_io
from selfalign.models.backbone import DiffusionTransformer
from selfalign.pipeline.convert import experiment_for, export_state, import_state, read_tensors
from selfalign.pipeline.convert_args import RELEASED_ARGS
from selfalign.pipeline.convert_optimizer import optimizer_to_released, released_parameter_names
from selfalign.runs import load_for_inference

MANIFEST = json.loads((Path(__file__).parent / "data" / "sra_layouts.json").read_text())
LAYOUTS = MANIFEST["layouts"]
RUNNABLE = [name for name, entry in LAYOUTS.items() if "note" not in entry or "decoder_hidden_size=384" in name]
BROKEN_SIT_S = "SiT-S/2"
STEPS, EPOCH = 250_250, 49          # 250,250 steps x 256 = epoch 50.0 of ImageNet-1k; the file says 49


def heads_of(name: str) -> int:
    hidden = LAYOUTS[name]["state_dict"][1][1][0]
    return {384: 6, 768: 12}[hidden]


def released_checkpoint(name: str, *, device: str = "cpu", seed: int = 0, **args) -> dict:
    """A train.py checkpoint of the manifest's layout, random values (meta: shapes only)."""
    entry = LAYOUTS[name]
    generator = torch.Generator().manual_seed(seed)

    def tensor(shape, scale):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=generator) * scale

    keys = entry["state_dict"]
    frozen = set(entry["requires_grad_false"])
    state = {i: {"step": torch.tensor(float(STEPS)), "exp_avg": tensor(shape, 1e-3),
                 "exp_avg_sq": tensor(shape, 1e-3).abs()}
             for i, (key, shape) in enumerate(keys) if key not in frozen}
    group = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, foreach=None,
                 maximize=False, capturable=False, differentiable=False, fused=None, params=list(range(len(keys))))
    assert list(group) == MANIFEST["checkpoint"]["opt"]["param_group_keys"]
    family = entry["family"]
    namespace = argparse.Namespace(**{**MANIFEST["args"][family], "model": name.split()[0], "exp_name": "sra-run",
                                      **args})
    return {"model": {k: tensor(s, 0.02) for k, s in keys}, "ema": {k: tensor(s, 0.02) for k, s in keys},
            "opt": {"state": state, "param_groups": [group]}, "args": namespace, "epoch": EPOCH, "steps": STEPS}


def released_forward(state, x, t, y, *, heads, block_out, training):
    """The released SiT/DiT forward (models/sit.py, models/dit.py) written out over the released
    state-dict names: patchify + pos_embed, sin/cos time MLP + class embedding, adaLN-Zero blocks
    (timm attention and tanh-GELU MLP), ap_head on block ``block_out`` when training, final adaLN
    layer, unpatchify. Returns (output, aligned tokens)."""
    w = lambda name: (state[f"{name}.weight"], state[f"{name}.bias"])        # noqa: E731
    linear = lambda v, name: F.linear(v, *w(name))                           # noqa: E731
    norm = lambda v: F.layer_norm(v, v.shape[-1:], eps=1e-6)                  # noqa: E731
    modulate = lambda v, shift, scale: v * (1 + scale[:, None]) + shift[:, None]   # noqa: E731
    patch = state["x_embedder.proj.weight"].shape[-1]
    tokens = F.conv2d(x, *w("x_embedder.proj"), stride=patch).flatten(2).transpose(1, 2) + state["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    angles = t[:, None].float() * freqs[None]
    time = linear(F.silu(linear(torch.cat([torch.cos(angles), torch.sin(angles)], -1), "t_embedder.mlp.0")),
                  "t_embedder.mlp.2")
    c = time + state["y_embedder.embedding_table.weight"][y]
    b, n, d = tokens.shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    aligned = None
    for i in range(depth):
        p = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), p + "adaLN_modulation.1").chunk(6, -1)
        q, k, v = linear(modulate(norm(tokens), shift1, scale1), p + "attn.qkv").reshape(
            b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        tokens = tokens + gate1[:, None] * linear(attended, p + "attn.proj")
        hidden = F.gelu(linear(modulate(norm(tokens), shift2, scale2), p + "mlp.fc1"), approximate="tanh")
        tokens = tokens + gate2[:, None] * linear(hidden, p + "mlp.fc2")
        if i + 1 == block_out:
            aligned = (linear(F.silu(linear(tokens, "ap_head.linear1")), "ap_head.linear2") if training
                       else tokens)
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = linear(modulate(norm(tokens), shift, scale), "final_layer.linear")
    grid, channels = math.isqrt(n), out.shape[-1] // patch ** 2
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(b, grid, grid, patch, patch, channels))
    return out.reshape(b, channels, grid * patch, grid * patch), aligned


def shapes(state: dict) -> list:
    return [[k, list(v.shape)] for k, v in state.items()]


# -- the manifest and the layouts (shapes only: every size, no memory) -----------------------------
def test_the_manifest_says_where_it_comes_from():
    assert MANIFEST["source"]["commit"].startswith("1723f85") and MANIFEST["derivation"]
    assert {(e["family"], name.split("-")[1][:1]) for name, e in LAYOUTS.items()} == {
        ("SiT", "S"), ("SiT", "B"), ("DiT", "S"), ("DiT", "B")}
    assert MANIFEST["checkpoint"]["keys"] == ["model", "ema", "opt", "args", "epoch", "steps"]


def test_the_argument_table_is_the_released_train_py():
    assert {family: list(args.items()) for family, args in RELEASED_ARGS.items()} == {
        family: list(args.items()) for family, args in MANIFEST["args"].items()}


@pytest.mark.parametrize("name", RUNNABLE)
def test_import_then_export_gives_the_manifest_layout(name):
    entry = LAYOUTS[name]
    official = released_checkpoint(name, device="meta")
    converted = import_state(official, "sra", source="official.pt")
    family = entry["family"]
    assert converted.family == family and converted.preset == name.split()[0] and converted.step == STEPS
    assert set(converted.regularizers) == {"sra.head.0.weight", "sra.head.0.bias", "sra.head.2.weight",
                                           "sra.head.2.bias"} and set(converted.ema_head) == {
        k for k, _ in entry["state_dict"] if k.startswith("ap_head.")}
    assert converted.backbone.learn_sigma == (family == "DiT")
    assert released_parameter_names(converted.backbone) == [k for k, _ in entry["state_dict"]]
    out, _ = export_state(converted.model, converted.ema, converted.regularizers, converted.backbone, "sra",
                          converted.ema_head)
    assert shapes(out["model"]) == entry["state_dict"] and shapes(out["ema"]) == entry["state_dict"]
    opt, why = optimizer_to_released(converted.optimizer, converted.backbone, with_head=True)
    assert why == "" and opt["param_groups"] == official["opt"]["param_groups"]
    frozen = {i for i, (k, _) in enumerate(entry["state_dict"]) if k in entry["requires_grad_false"]}
    assert sorted(opt["state"]) == [i for i in range(len(entry["state_dict"])) if i not in frozen]
    for index, slots in opt["state"].items():
        assert list(slots["exp_avg"].shape) == entry["state_dict"][index][1]


@pytest.mark.parametrize("name", RUNNABLE)
def test_the_config_is_what_the_released_args_ran(name):
    family = LAYOUTS[name]["family"]
    converted = import_state(released_checkpoint(name, device="meta", block_out_s=3, block_out_t=7,
                                                 gradient_accumulation_steps=2, mixed_precision="bf16"), "sra")
    config = experiment_for(converted)
    sra, t = config.regularizers["sra"], config.train
    assert (sra.student_layer, sra.teacher_layer) == (3, 7)
    assert (t.batch_size, t.micro_batch, t.precision, t.lr, t.grad_clip) == (32 * 8 * 2, 32, "bf16", 1e-4, 1.0)
    assert t.total_kimg == 4_100_000 * 512 / 1000 and t.ckpt_every_kimg == 50_000 * 512 / 1000
    assert (sra.teacher_precision, sra.teacher_truncate, t.label_dropout) == ("fp32", False, 0.1)
    if family == "SiT":     # default --loss-type cos: channel cosine, 0.5 constant
        assert config.objective.kind == "flow" and sra.k_max == 0.2
        assert (sra.distance, sra.weight, sra.weight_schedule) == ("channel_cosine", 0.5, "constant")
    else:                   # smooth-L1, 0.4 x 0.1 with the epoch decay; --t-max 0.1 by default
        assert config.objective.kind == "ddpm" and config.model.learn_sigma and sra.k_max == 0.1
        assert (sra.distance, sra.weight, sra.weight_schedule) == ("smooth_l1", 0.04, "official_decay")
        assert (sra.decay_start_epoch, sra.decay_period) == (149, 1000.0)
    unused = [n for n in converted.notes if n.startswith("args.")]
    assert sorted(n.split("=")[0] for n in unused) == sorted(
        f"args.{k}" for k in ("output_dir", "logging_dir", "resume_ckpt", "checkpoint_epochs", "data_dir_train",
                              "fused_attn", "epochs"))


def test_the_released_sit_s_preset_is_refused_in_one_line():
    with pytest.raises(CheckpointError, match=r"final layer is 768 wide but its blocks are 384 wide") as err:
        import_state(released_checkpoint(BROKEN_SIT_S, device="meta"), "sra", source="sit-s.pt")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("wrong", ["dit", "sit", "repa"])
def test_an_sra_checkpoint_under_another_layout_is_refused(wrong):
    with pytest.raises(CheckpointError, match="holds ap_head.*use --from sra"):
        import_state(released_checkpoint("DiT-S/2", device="meta"), wrong, source="dit-sra.pt")


# -- numbers: files through the command line, forward and round trip --------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["SiT-S/2 decoder_hidden_size=384", "DiT-S/2"])
def test_official_to_selfalign_to_official_is_exact_and_computes_the_same(tmp_path, capsys, name):
    family = LAYOUTS[name]["family"]
    source = tmp_path / "official.pt"
    torch.save(released_checkpoint(name), source)
    run = tmp_path / "run"
    assert main(["convert", "import", str(source), str(run), "--from", "sra"]) == 0
    printed = capsys.readouterr().out
    assert f"(sra: {family}) as {name.split()[0]}" in printed and f"step {STEPS}" in printed
    ckpt = ckpt_io.latest_checkpoint(run)
    state = ckpt_io.read_state(ckpt)
    assert state["step"] == STEPS and state["images"] == STEPS * 256 and state["data"]["position"] == STEPS * 256

    official = read_tensors(source)
    model, objective, config = load_for_inference(run)              # the EMA, as sampling uses it
    student = DiffusionTransformer(config.backbone_config()).eval()
    student.load_state_dict(ckpt_io.load_tensors(ckpt, "model"))
    head = ckpt_io.load_tensors(ckpt, "regularizers")
    layer = config.regularizers["sra"].student_layer
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 32, 32, generator=g)
    y = torch.tensor([3, 1000])
    t = torch.tensor([0.3, 0.9]) if family == "SiT" else torch.tensor([17.0, 901.0])
    heads = heads_of(name)
    with torch.no_grad():
        out_ema, raw = released_forward(official["ema"], x, t, y, heads=heads, block_out=layer, training=False)
        ours, feats = model(x, objective.model_time(t), y, taps=[layer])
        torch.testing.assert_close(ours, out_ema, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats[layer], raw, rtol=1e-4, atol=1e-5)
        out, aligned = released_forward(official["model"], x, t, y, heads=heads, block_out=layer, training=True)
        ours, feats = student(x, t, y, taps=[layer])
        mine = F.linear(F.silu(F.linear(feats[layer], head["sra.head.0.weight"], head["sra.head.0.bias"])),
                        head["sra.head.2.weight"], head["sra.head.2.bias"])
        torch.testing.assert_close(ours, out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine, aligned, rtol=1e-4, atol=1e-5)
    del model, student, head

    exported = tmp_path / "exported.pt"
    assert main(["convert", "export", str(run), str(exported), "--to", "sra"]) == 0
    back = read_tensors(exported)
    assert list(back) == MANIFEST["checkpoint"]["keys"]
    for part in ("model", "ema"):
        assert list(back[part]) == list(official[part])
        assert all(torch.equal(back[part][k], v) for k, v in official[part].items()), part
    assert back["opt"]["param_groups"] == official["opt"]["param_groups"]
    assert sorted(back["opt"]["state"]) == sorted(official["opt"]["state"])
    for index, slots in official["opt"]["state"].items():
        assert all(torch.equal(back["opt"]["state"][index][k], v) for k, v in slots.items())
    assert vars(back["args"]) == vars(official["args"])
    assert (back["epoch"], back["steps"]) == (EPOCH, STEPS)

    before = exported.stat().st_mtime_ns
    assert main(["convert", "export", str(run), str(exported), "--to", "sra"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists; pass --force" in err and len(err.splitlines()) == 1 and exported.stat().st_mtime_ns == before
    assert main(["convert", "export", str(run), str(exported), "--to", "sra", "--force"]) == 0
