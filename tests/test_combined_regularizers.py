"""Several regularizers in one step (each weighted, each logged), and every preset of REPA,
dispersive loss, SRA 2 and DTS: the ImageNet ones build, the Fashion-MNIST ones train a few
steps on CPU with the real trainer."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from selfalign.config.experiment import PRESET_DIR, load_config
from selfalign.ema import EMA
from selfalign.models.classifier import FashionClassifier
from selfalign.models.backbone import DiffusionTransformer
from selfalign.objectives import FlowObjective
from selfalign.regularizers import build_regularizer
from selfalign.regularizers.dispersive import Dispersive, DispersiveConfig
from selfalign.regularizers.repa import REPA
from selfalign.regularizers.sra import SRA, SRAConfig
from selfalign.regularizers.sra2 import SRA2, SRA2Config
from selfalign.training.step import TrainingStep
from selfalign.training.trainer import train

METHODS = ("repa", "dispersive", "sra2", "dts")
FMNIST_PRESETS = sorted(p.stem for p in PRESET_DIR.glob("fmnist-cpu-tiny-*.yaml")
                        if p.stem.split("fmnist-cpu-tiny-")[1] in (*METHODS, "sra-dispersive"))
IMAGENET_PRESETS = sorted(p.stem for p in PRESET_DIR.glob("sit-*-256-*.yaml")
                          if p.stem.rsplit("-", 1)[1] in METHODS)


# Tiny models on a busy 2-core machine: one intra-op thread avoids spinning threads (a preset's
# two trainer steps take seconds instead of tens of seconds here).
pytestmark = pytest.mark.usefixtures("single_thread")


def test_sra_plus_dispersive_plus_sra2_each_weighted_and_logged(tiny_model):
    model = tiny_model(in_channels=1)
    regs = {"sra": SRA(SRAConfig(student_layer=2, teacher_layer=4), model.config),
            "dispersive": Dispersive(DispersiveConfig(layer=3), model.config),
            "sra2": SRA2(SRA2Config(layer=2), model.config)}
    step = TrainingStep(model, FlowObjective(), regs)
    assert step.student_layers() == [2, 3]                       # one forward taps the union
    total, terms = step(torch.randn(4, 1, 8, 8), torch.arange(4), teacher=EMA(model).model,
                        generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"gen", "sra", "dispersive", "sra2"}
    expected = terms["gen"] + 0.2 * terms["sra"] + 0.25 * terms["dispersive"] + 0.2 * terms["sra2"]
    assert torch.allclose(total, expected)
    # each head learns from its own loss only
    terms["sra2"].backward(retain_graph=True)
    assert all(p.grad is None for p in regs["sra"].head.parameters())
    assert all(p.grad is not None for p in regs["sra2"].head.parameters())


@pytest.mark.parametrize("name", IMAGENET_PRESETS)
def test_imagenet_presets_build(name):
    config = load_config(name)
    assert config.data.kind == "latents" and set(config.regularizers) <= set(METHODS)
    with torch.device("meta"):                                   # shapes only, no 675 M-weight init
        model = DiffusionTransformer(config.backbone_config())
        for reg_name, reg_config in config.regularizers.items():
            if reg_name == "repa":     # DINOv2 needs a download; check the projector's shape
                encoder = torch.nn.Identity()
                encoder.embed_dim = 768
                reg = REPA(reg_config, model.config, encoder=encoder)
                assert reg.projector[-1].out_features == 768 and reg_config.layer in (4, 8)
            else:
                reg = build_regularizer(reg_name, reg_config, model.config)
            assert max(reg.student_layers()) <= model.depth


def test_preset_lists_are_complete():
    assert len(FMNIST_PRESETS) == 5 and len(IMAGENET_PRESETS) == 8


@pytest.mark.parametrize("name", FMNIST_PRESETS)
def test_fmnist_presets_train_two_steps_on_cpu(name, tmp_path):
    classifier = tmp_path / "classifier.safetensors"      # the stand-in encoder's weights (random)
    save_file(FashionClassifier().state_dict(), str(classifier))
    overrides = ["train.batch_size=4", "train.total_kimg=0.008", "train.log_every_kimg=0.004",
                 "train.ckpt_every_kimg=0.008", "train.sample_every_kimg=0", "train.eval_every_kimg=0",
                 "train.device=cpu", "logging.progress_bar=false", "logging.tensorboard=false"]
    if name.endswith("-repa"):
        overrides.append(f"regularizers.repa.encoder_weights={classifier}")
    config = load_config(name, overrides)
    result = train(config, tmp_path / "run", log=lambda *_: None)
    assert result.step == 2 and result.skipped_steps == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if row.get("kind") == "train"]
    for reg_name in config.regularizers:                   # each regularizer's own loss, finite
        values = [row[f"loss/{reg_name}"] for row in logged]
        assert values and all(torch.isfinite(torch.tensor(v)) for v in values)
    state = Path(result.checkpoint) / "regularizers.safetensors"
    assert state.is_file()
