"""REPA: the loss on hand-made tensors, the projector, the frozen encoder kept out of training,
gradients, preprocessing, token-grid matching and the encoder adapters (DINOv2 layouts, the
Fashion-MNIST classifier)."""
import contextlib
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from selfalign.models import backbone_config
from selfalign.errors import CheckpointError, ConfigError, UsageError
from selfalign.models.classifier import FashionClassifier
from selfalign.objectives import FlowObjective
from selfalign.regularizers import REGISTRY, StepContext
from selfalign.regularizers import encoders
from selfalign.regularizers.encoders import (DINOv2Encoder, FeatureMapEncoder, fashion_classifier_encoder,
                                             load_dinov2, match_token_grid, preprocess,
                                             resample_abs_pos_embed)
from selfalign.regularizers.repa import REPA, REPAConfig
from selfalign.training.step import TrainingStep


class FixedTokens(nn.Module):
    """An 'encoder' returning given tokens, whatever the images."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.embed_dim = tokens.shape[-1]
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images):
        return self.tokens[: len(images)] * self.scale


def tiny_cnn_encoder(channels=1, width=8):
    net = nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU())
    return FeatureMapEncoder(net, width, channels=channels)


def make_ctx(model, x0, feats, images=None):
    b = len(x0)
    return StepContext(model=model, objective=FlowObjective(), x0=x0, noise=x0, t=torch.zeros(b),
                       x_t=x0, y=torch.zeros(b, dtype=torch.long), images=images, features=feats)


def test_negative_cosine_on_hand_made_tokens(tiny_model):
    model = tiny_model(input_size=4, in_channels=1)           # 2x2 = 4 tokens
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]]])
    reg = REPA(REPAConfig(layer=2), model.config, encoder=FixedTokens(target))
    reg.projector = nn.Identity()                            # look at the loss alone
    feats = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]])
    # cosines per token: 1, 0, -1, 1/sqrt(2); REPA: minus their mean
    expected = -(1 + 0 - 1 + 2 ** -0.5) / 4
    loss = reg(make_ctx(model, torch.zeros(1, 1, 4, 4), {2: feats}))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_projector_is_repas_three_layer_mlp(tiny_model):
    model = tiny_model(in_channels=1)
    reg = REPA(REPAConfig(layer=2), model.config, encoder=tiny_cnn_encoder(width=24))
    layers = list(reg.projector)
    assert [type(m) for m in layers] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in layers[::2]] == [(128, 2048), (2048, 2048), (2048, 24)]


def test_depth_presets_and_config_checks():
    assert REPAConfig.for_model("SiT-B/2").layer == 4
    assert REPAConfig.for_model("SiT-L/2").layer == 8 and REPAConfig.for_model("SiT-XL/2").layer == 8
    assert REPAConfig().weight == 0.5
    with pytest.raises(ConfigError, match=r"^repa.layer=13 must be a block in 1..12$"):
        REPAConfig(layer=13).validate(depth=12)
    with pytest.raises(ConfigError, match=r"^repa.encoder_layout: expected one of 'timm', 'hub', got 'onnx'$"):
        REPAConfig(encoder_layout="onnx").validate(depth=12)
    with pytest.raises(ConfigError, match=r"^repa.encoder: expected one of 'dinov2-vits14', .*, got 'clip'$"):
        REPA(REPAConfig(layer=2, encoder="clip"), backbone_config("SiT-T/2", input_size=8, in_channels=1))


def test_encoder_is_frozen_outside_optimizer_and_checkpoint(tiny_model):
    model = tiny_model(in_channels=1)
    encoder = tiny_cnn_encoder()
    reg = REPA(REPAConfig(layer=2, projector_dim=16), model.config, encoder=encoder)
    step = TrainingStep(model, FlowObjective(), {"repa": reg})
    encoder_params = {id(p) for p in encoder.parameters()}
    assert encoder_params and not encoder_params & {id(p) for p in step.parameters()}
    assert not any("encoder" in key for key in step.state_dict())
    step.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    total, terms = step(torch.rand(3, 1, 8, 8) * 2 - 1, torch.arange(3),
                        generator=torch.Generator().manual_seed(0))
    total.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert "repa" in terms and torch.isfinite(terms["repa"])


def test_gradients_reach_exactly_the_blocks_up_to_d_and_the_projector(tiny_model):
    model = tiny_model(in_channels=1)
    reg = REPA(REPAConfig(layer=3, projector_dim=16), model.config, encoder=tiny_cnn_encoder())
    step = TrainingStep(model, FlowObjective(), {"repa": reg})
    _, terms = step(torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4),
                    generator=torch.Generator().manual_seed(1))
    terms["repa"].backward()
    upstream = ("x_embedder", "t_embedder", "y_embedder", "blocks.0.", "blocks.1.", "blocks.2.")
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == name.startswith(upstream), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.projector.parameters())


def test_pixel_data_uses_x0_latents_need_images(tiny_model):
    model = tiny_model(in_channels=4)
    reg = REPA(REPAConfig(layer=2, projector_dim=16), model.config, encoder=tiny_cnn_encoder(channels=3))
    assert reg.needs_images()
    x0 = torch.randn(2, 4, 8, 8)
    feats = {2: torch.randn(2, 16, 128)}
    for images in (None, x0):                                  # no images, or the latents again
        with pytest.raises(ConfigError, match="raw images"):
            reg(make_ctx(model, x0, feats, images=images))
    images = torch.rand(2, 3, 64, 64) * 2 - 1                 # images at 8x the latent size
    assert torch.isfinite(reg(make_ctx(model, x0, feats, images=images)))


def test_preprocess_channels_normalisation_and_size():
    images = torch.ones(2, 1, 10, 10)                          # white, in [-1, 1]
    x = preprocess(images, 14, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD, channels=3)
    assert x.shape == (2, 3, 14, 14)
    expected = [(1 - m) / s for m, s in zip(encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)]
    assert torch.allclose(x[0, :, 5, 5], torch.tensor(expected), atol=1e-5)
    gray = preprocess(torch.zeros(1, 3, 4, 4), None, (0.5,), (0.5,), channels=1)
    assert gray.shape == (1, 1, 4, 4) and torch.allclose(gray, torch.zeros_like(gray), atol=1e-6)


def test_match_token_grid():
    tokens = torch.randn(2, 16, 3)
    assert match_token_grid(tokens, (4, 4)) is tokens
    const = torch.full((1, 49, 5), 2.5)
    assert torch.allclose(match_token_grid(const, (16, 16)), torch.full((1, 256, 5), 2.5))
    assert torch.allclose(match_token_grid(const, (3, 3)), torch.full((1, 9, 5), 2.5))
    # row-major order is kept: a map that grows along rows still grows along rows after resizing
    ramp = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1)        # rows 0..3
    up = match_token_grid(ramp, (8, 8)).view(8, 8)
    assert (up[1:, 0] >= up[:-1, 0]).all() and torch.allclose(up[:, 0], up[:, 7])


def test_pos_embed_resampling_keeps_the_class_token():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_abs_pos_embed(pos, (16, 16))
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, 0], pos[:, 0])
    assert resample_abs_pos_embed(out, (16, 16)) is out


class FakeViT(nn.Module):
    """Just enough of DINOv2 for the adapters: a patch-14 linear embedding + prefix tokens."""

    def __init__(self, dim=6, layout="timm"):
        super().__init__()
        self.embed_dim, self.num_prefix_tokens, self.layout = dim, 1, layout
        self.proj = nn.Conv2d(3, dim, 14, 14)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + 37 * 37, dim))
        self.seen = None

    def forward_features(self, x):
        self.seen = x
        patches = self.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)
        return {"x_norm_patchtokens": patches} if self.layout == "hub" else tokens


@pytest.mark.parametrize("layout", ["timm", "hub"])
def test_dinov2_adapter_layouts(layout):
    vit = FakeViT(layout=layout)
    enc = DINOv2Encoder(vit, layout=layout, input_size=224)
    out = enc(torch.rand(2, 3, 256, 256) * 2 - 1)
    assert out.shape == (2, 256, 6) and vit.seen.shape == (2, 3, 224, 224)
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())


def test_dinov2_hub_layout_from_a_local_clone_and_weight_file(tmp_path):
    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_repa import FakeViT
        def dinov2_vits14(pretrained=True):
            assert not pretrained, "offline: weights come from the local file"
            return FakeViT(layout="hub")
    """))
    weights = FakeViT(layout="hub").state_dict()
    save_file(weights, str(tmp_path / "w.safetensors"))
    enc = load_dinov2("dinov2-vits14", layout="hub", weights=str(tmp_path / "w.safetensors"),
                      grid=16, hub_repo=str(repo))
    assert enc.input_size == 224 and enc.model.pos_embed.shape == (1, 257, 6)
    assert torch.equal(enc.model.proj.weight, weights["proj.weight"])
    assert enc(torch.zeros(1, 3, 256, 256)).shape == (1, 256, 6)


def test_dinov2_loader_errors(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="unknown DINOv2 encoder"):
        load_dinov2("dinov2-vitq14")
    with pytest.raises(CheckpointError, match="not found"):
        load_dinov2("dinov2-vitb14", weights=str(tmp_path / "missing.pth"))
    monkeypatch.setitem(sys.modules, "timm", None)            # timm absent: one clear line
    with pytest.raises(UsageError, match=r"selfalign\[timm\]"):
        load_dinov2("dinov2-vitb14-reg", layout="timm")


def test_fashion_classifier_stand_in(tmp_path, tiny_model):
    classifier = FashionClassifier()
    save_file(classifier.state_dict(), str(tmp_path / "clf.safetensors"))
    model = tiny_model(input_size=32, in_channels=1)                      # 16x16 tokens
    config = REPAConfig(layer=2, encoder="fmnist-classifier", projector_dim=16,
                        encoder_weights=str(tmp_path / "clf.safetensors"))
    reg = REGISTRY["repa"].regularizer(config, model.config)
    assert reg.encoder.embed_dim == 128 and not reg.encoder.training
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    expected = classifier.eval().tokens(images)                           # (2, 49, 128)
    assert torch.allclose(reg.encoder(images), expected, atol=1e-5)
    target = reg.target(images, (16, 16), contextlib.nullcontext)
    assert target.shape == (2, 256, 128)
    assert fashion_classifier_encoder(classifier=classifier, stage=1)(images).shape == (2, 196, 64)
