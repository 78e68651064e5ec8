"""selfalign convert: released layouts import to the same function (SiT's reversed time included),
round trips are exact, misfits are refused naming the first mismatch, pickled code is never run."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from selfalign.cli import main
from selfalign.errors import CheckpointError
from selfalign.models import build_model
from selfalign.pipeline.convert import (export_checkpoint, export_state, import_checkpoint, import_state,
                                        read_tensors, time_reflection)
from selfalign.runs import load_for_inference

from conftest import randomize_zero_init

KW = dict(input_size=8, in_channels=4, num_classes=10)


def model(name="SiT-T/2", seed=0, **kw):
    torch.manual_seed(seed)
    m = build_model(name, **{**KW, **kw})
    with torch.no_grad():          # pos_embed travels as a tensor; make sure it is really copied
        m.pos_embed.add_(0.01 * torch.randn(m.pos_embed.shape))
    return randomize_zero_init(m, seed=seed).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 3, 9, 10])


def released_sit(seed=4):
    """An original SiT state dict (learn_sigma=True): the sigma half of its output is discarded by
    SiT's forward, so it never trains and keeps its zero initialisation."""
    state = model(learn_sigma=True, seed=seed).state_dict()
    keep = (torch.arange(2 * 2 * 8) % 8) < 4        # (p, q, c) rows, c fastest: the first C of 2C
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        state[key][~keep] = 0
    return state


def original_sit(state):
    """The original SiT's forward (learn_sigma=True, t = 1 is data) from its state dict."""
    net = build_model("SiT-T/2", learn_sigma=True, **KW).eval()
    net.load_state_dict(state)
    return lambda x, t, y: net(x, t, y)[:, :4]


def test_time_reflection_maps_the_embedding_of_t_to_that_of_1_minus_t():
    from selfalign.models.backbone import TimestepEmbedder
    t = torch.tensor([0.0, 0.1, 0.5, 0.97, 1.0])
    m = time_reflection(256)
    emb = TimestepEmbedder.frequencies(t, 256).double()
    torch.testing.assert_close(emb @ m.T, TimestepEmbedder.frequencies(1 - t, 256).double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(m @ m, torch.eye(256, dtype=torch.float64), atol=1e-12, rtol=0)


def test_original_sit_gives_the_same_velocity_field_and_sampling_trajectory():
    sit_state = released_sit()
    original = original_sit(sit_state)
    converted = import_state(sit_state, "sit")
    ours = build_model(converted.preset, **KW).eval()
    ours.load_state_dict(converted.ema)
    x, y = inputs()
    with torch.no_grad():
        for s in (0.0, 0.25, 0.6, 1.0):
            t = torch.full((4,), s)
            torch.testing.assert_close(ours(x, t, y), -original(x, 1 - t, y), atol=2e-6, rtol=1e-5)
        # Euler from noise: SiT integrates t = 0 -> 1 (to data), selfalign s = 1 -> 0; same grid.
        steps = torch.linspace(0, 1, 21)
        a, b = x.clone(), x.clone()
        for t0, t1 in zip(steps[:-1], steps[1:]):
            a = a + (t1 - t0) * original(a, torch.full((4,), float(t0)), y)
            s0, s1 = 1 - t0, 1 - t1
            b = b + (s1 - s0) * ours(b, torch.full((4,), float(s0)), y)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout, name", [("sra", "SiT-T/2"), ("repa", "SiT-T/2"), ("dit", "DiT-T/2")])
def test_round_trip_is_exact(layout, name):
    net = model(name)
    state = net.state_dict()
    heads = {"sra": {"sra.head.0.weight": torch.randn(256, 128), "sra.head.0.bias": torch.randn(256),
                     "sra.head.2.weight": torch.randn(128, 256), "sra.head.2.bias": torch.randn(128)},
             "repa": {f"repa.projector.{j}.{p}": torch.randn(*s) for j, shapes in
                      {0: ((64, 128), (64,)), 2: ((64, 64), (64,)), 4: ((32, 64), (32,))}.items()
                      for p, s in zip(("weight", "bias"), shapes)}}.get(layout, {})
    released, _ = export_state(state, state, heads, net.config, layout)
    back = import_state(released, layout, keep_heads=True)
    assert back.preset == name and set(back.ema) == set(state)
    assert all(torch.equal(back.ema[k], state[k]) for k in state)
    assert set(back.regularizers) == set(heads) and all(torch.equal(back.regularizers[k], heads[k]) for k in heads)
    again = build_model(name, **KW).eval()
    again.load_state_dict(back.ema)
    x, y = inputs()
    t = torch.tensor([1.0, 50.0, 500.0, 999.0]) if layout == "dit" else torch.tensor([0.0, 0.3, 0.7, 1.0])
    with torch.no_grad():
        assert torch.equal(again(x, t, y), net(x, t, y))


def test_sit_round_trip_is_exact_to_float_rounding():
    net = model()
    released, _ = export_state(net.state_dict(), net.state_dict(), {}, net.config, "sit")
    assert released["ema"]["final_layer.linear.weight"].shape[0] == 2 * 4 * 4
    back = import_state(released, "sit")
    for key, value in net.state_dict().items():
        torch.testing.assert_close(back.ema[key], value, atol=1e-7, rtol=1e-6)


def test_files_and_cli_import_export(tmp_path, capsys):
    # A REPA training checkpoint as REPA writes it: model/ema/opt-free, args Namespace, steps.
    net = model()
    state = {**net.state_dict(), **{f"projectors.0.{j}.weight": torch.randn(8, 128 if j == 0 else 8) for j in (0, 2, 4)},
             **{f"projectors.0.{j}.bias": torch.randn(8) for j in (0, 2, 4)}}
    src = tmp_path / "repa.pt"
    torch.save({"model": state, "ema": state, "args": argparse.Namespace(model="SiT-T/2", lr=1e-4), "steps": 400}, src)
    assert main(["convert", "import", str(src), str(tmp_path / "run"), "--from", "repa"]) == 0
    assert "dropped 6 head tensors (projectors.*)" in capsys.readouterr().out
    loaded, objective, config = load_for_inference(tmp_path / "run")
    assert config.model.preset == "SiT-T/2" and objective.kind == "flow"
    x, y = inputs()
    t = torch.rand(4)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), net(x, t, y))
    assert main(["convert", "export", str(tmp_path / "run"), str(tmp_path / "out.pt"), "--to", "sit"]) == 0
    exported = read_tensors(tmp_path / "out.pt")
    assert exported["steps"] == 400
    original = original_sit(exported["ema"])
    with torch.no_grad():
        torch.testing.assert_close(original(x, 1 - t, y), -net(x, t, y), atol=2e-6, rtol=1e-5)
    path, _ = export_checkpoint(tmp_path / "run", "sra", tmp_path / "ema.safetensors")
    path2, converted = import_checkpoint(path, "sra", tmp_path / "run2")
    assert all(torch.equal(converted.ema[k], v) for k, v in net.state_dict().items())


def test_misfits_are_refused_naming_the_first_mismatch(tmp_path, capsys):
    state = model().state_dict()
    with pytest.raises(CheckpointError, match=r"'pos_embed' has shape \(1, 16, 128\), the preset needs "
                                              r"\(1, 16, 256\).*looks like SiT-T/2"):
        import_state(state, "sra", preset="SiT-M/2")
    broken = {k: v for k, v in state.items() if k != "blocks.3.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match="lacks 'blocks.3.mlp.fc2.bias'"):
        import_state(broken, "repa")
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        import_state({**state, "extra.weight": torch.zeros(1)}, "sra")
    torch.save(state, tmp_path / "sit.pt")
    assert main(["convert", "import", str(tmp_path / "sit.pt"), str(tmp_path / "r"), "--from", "sra",
                 "--preset", "SiT-T/4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'pos_embed' has shape (1, 16, 128), the preset needs (1, 4, 128)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("state, layout, fragment", [
    ("flow", "sit", "4 output channels.*use --from sra"),       # a REPA/SRA SiT is no original SiT
    ("flow", "dit", "4 output channels.*use --from sra"),
    ("sit", "dit", "sigma half of its final layer is zero.*use --from sit"),
    ("dit", "sit", "sigma half of its final layer is trained.*use --from dit"),
    ("dit", "sra", "sigma half of its final layer is trained.*use --from dit"),
    ("sit", "repa", "sigma half of its final layer is zero.*use --from sit"),
])
def test_a_checkpoint_of_another_family_is_refused_in_one_line(tmp_path, capsys, state, layout, fragment):
    tensors = {"flow": lambda: model().state_dict(), "sit": released_sit,
               "dit": lambda: model("DiT-T/2").state_dict()}[state]()
    with pytest.raises(CheckpointError, match=fragment):
        import_state(tensors, layout)
    torch.save(tensors, tmp_path / "ckpt.pt")
    assert main(["convert", "import", str(tmp_path / "ckpt.pt"), str(tmp_path / "run"), "--from", layout]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_preset_of_the_other_family_is_refused():
    with pytest.raises(CheckpointError, match="is a SiT model but checkpoint holds a DiT model"):
        import_state(model("DiT-T/2").state_dict(), "dit", preset="SiT-T/2")


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_malicious_pickle_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"ema": model().state_dict(), "payload": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused.*never unpickles code"):
        read_tensors(path)
    assert main(["convert", "import", str(path), str(tmp_path / "run"), "--from", "sra"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["convert", "import", "--processes", "0", "{tmp}/any.pt", "{tmp}/run", "--from", "sra"],
     "argument --processes: must be a whole number >= 1"),
    (["convert", "export", "{tmp}/run", "{tmp}/out.txt", "--to", "sra"], "use a .pt or .safetensors file name"),
    (["convert", "export", "{tmp}/no-run", "{tmp}/out.pt", "--to", "sra"], "does not exist"),
])
def test_flag_and_path_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, argv, fragment):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and not any(tmp_path.iterdir())


def test_a_selfalign_preset_exports_as_the_released_arguments_and_says_what_differs():
    from selfalign.config.experiment import load_config
    from selfalign.pipeline.convert_args import RELEASED_ARGS, config_to_args

    paper = json.loads(json.dumps(load_config("sit-xl2-256-sra").to_dict(), default=list))
    args, notes = config_to_args(paper, "SiT", None)
    assert list(args) == list(RELEASED_ARGS["SiT"])
    assert (args["batch_size"], args["mixed_precision"], args["loss_type"]) == (32, "bf16", "sml1")
    assert (args["block_out_s"], args["block_out_t"], args["t_max"], args["max_train_steps"]) == (8, 20, 0.2, 4_000_000)
    assert [n for n in notes if "SRA weight" in n] == [
        "the SRA weight here is 0.2 constant; the released code's resume uses 0.2 decaying by 10x every "
        "1000 epochs after epoch 149"]
    code = json.loads(json.dumps(load_config("dit-xl2-256-sra-code").to_dict(), default=list))
    args, notes = config_to_args(code, "DiT", None, processes=4)
    assert list(args) == list(RELEASED_ARGS["DiT"]) and args["batch_size"] == 64 and notes == []


def test_outputs_in_the_way_and_nonfinite_weights_are_one_line_and_leave_nothing(tmp_path, capsys):
    net = model()
    src = tmp_path / "sit.pt"
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "steps": 4}, src)
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    assert main(["convert", "import", str(src), str(blocker / "run"), "--from", "repa"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["convert", "import", str(src), str(tmp_path / "run"), "--from", "repa"]) == 0
    capsys.readouterr()
    assert main(["convert", "export", str(tmp_path / "run"), str(blocker / "out.pt"), "--to", "sit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "OUT_FILE" in err and "is a file" in err and "\n" not in err
    broken = {k: v.clone() for k, v in net.state_dict().items()}
    next(iter(broken.values())).fill_(float("nan"))
    torch.save({"model": broken, "ema": broken, "steps": 4}, tmp_path / "nan.pt")
    assert main(["convert", "import", str(tmp_path / "nan.pt"), str(tmp_path / "nan-run"), "--from", "repa"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "nan.pt", "run", "sit.pt"]
