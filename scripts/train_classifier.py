"""Train the Fashion-MNIST classifier used for in-domain metrics and as REPA's stand-in encoder.

    python scripts/train_classifier.py --out src/selfalign/assets/fashion_mnist_classifier.safetensors

Data from ``selfalign.data`` (no torchvision); augmentation: random translation by up to 2 pixels
and horizontal flips. AdamW with a one-cycle schedule. Prints the test accuracy after every epoch
and writes the weights (safetensors) plus a JSON record (accuracy, command, time) next to them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translation (zero = background padding) and horizontal flip of (B, 1, 28, 28) in [-1, 1]."""
    b, _, h, w = images.shape
    padded = F.pad(images, (shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(h))[:, :, None].expand(b, h, w)
    cols = (offsets[:, 1, None] + torch.arange(w))[:, None, :].expand(b, h, w)
    out = padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    from selfalign.data.transforms import uint8_to_model

    model.eval()
    correct = sum(int((model(uint8_to_model(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.3, help="fraction of steps the one-cycle LR rises")
    parser.add_argument("--init", default=None, help="start from these weights (continue training)")
    parser.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from selfalign.data.fashion_mnist import NATIVE_SIZE, FashionMNIST
    from selfalign.data.transforms import uint8_to_model
    from selfalign.models.classifier import FashionClassifier

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train = FashionMNIST("train", path=args.data, resolution=NATIVE_SIZE)
    test = FashionMNIST("test", path=args.data, resolution=NATIVE_SIZE)

    model = FashionClassifier()
    if args.init:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(args.init))
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch,
                                                   pct_start=args.warmup)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = augment(uint8_to_model(train.images[index]), generator).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        test_acc = accuracy(model, test.images, test.labels)
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / steps_per_epoch:.4f} test accuracy "
              f"{100 * test_acc:.2f}% ({time.time() - start:.0f}s)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out))
    record = {"test_accuracy": test_acc, "epochs": args.epochs, "seconds": round(time.time() - start),
              "threads": args.threads, "command": "python scripts/train_classifier.py " + " ".join(sys.argv[1:])}
    history = out.with_suffix(".json")
    if args.init and history.is_file() and Path(args.init).resolve() == out.resolve():
        record["continues"] = json.loads(history.read_text())     # keep the whole recipe on record
    history.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} (test accuracy {100 * test_acc:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
