"""The pipeline a user writes without fedscan: the yardstick for fedscan's defaults.

torchvision ``ImageFolder`` with per-sample PIL decode and resize on every
epoch, the ImageNet EfficientNet-Lite0 (timm, the same packaged weights fedscan
loads), every layer trained, 128 px, 3 epochs, AdamW with a one-cycle schedule,
batch 32, centralised, no validation split and no model selection: train on
``Training/``, score ``Testing/``. Nothing here is fedscan's; the only fedscan
call is the weight loader (so both sides start from the same bytes).

    python benchmarks/plain_baseline.py [--data DIR] [--seed N] [--out preds.json]

``benchmarks/default_vs_plain.py`` runs it beside ``fedscan train`` and scores
its predictions on both test splits (``test_official`` = ``Testing/``;
``test_dedup`` = the same minus images pixel-identical to a training image).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from fedscan.common.learn.models.efficientnet_lite import imagenet_lite0

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run_plain(
    data: Path,
    *,
    size: int = 128,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 1e-3,
    workers: int = 2,
    limit: int | None = None,
    seed: int = 0,
) -> dict:
    """Train and test the plain pipeline; accuracy, wall seconds and per-file predictions."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train_tf = transforms.Compose(
        [transforms.Resize((size, size)), transforms.RandomHorizontalFlip(), *norm]
    )
    test_tf = transforms.Compose([transforms.Resize((size, size)), *norm])
    train_set = datasets.ImageFolder(data / "Training", transform=train_tf)
    test_set = datasets.ImageFolder(data / "Testing", transform=test_tf)
    if limit:  # smoke runs: a strided subset of each folder
        train_set = Subset(train_set, range(0, len(train_set), max(1, len(train_set) // limit)))
        test_set = Subset(test_set, range(0, len(test_set), max(1, len(test_set) // limit)))
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)
    test = DataLoader(test_set, batch_size=64, num_workers=workers)

    model = imagenet_lite0()
    classes = (train_set.dataset if limit else train_set).classes
    model.reset_classifier(len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for x, y in train:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
            seen += len(y)
        print(
            f"plain: epoch {epoch + 1}/{epochs} {seen} images {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    model.eval()
    preds: list[int] = []
    with torch.inference_mode():
        for x, _ in test:
            preds.extend(model(x).argmax(1).tolist())
    base = test_set.dataset if limit else test_set
    idx = list(test_set.indices) if limit else range(len(base))
    files = [str(Path(base.samples[i][0]).resolve()) for i in idx]
    truth = [base.samples[i][1] for i in idx]
    correct = sum(p == t for p, t in zip(preds, truth, strict=True))
    return {
        "classes": classes,
        "accuracy": correct / len(truth),
        "seconds": time.perf_counter() - start,
        "predictions": {f: [p, t] for f, p, t in zip(files, preds, truth, strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/plain_baseline.py", description=__doc__)
    default = Path(os.environ.get("FEDSCAN_DATA", "../shared/datasets")) / "brain-tumor-mri"
    p.add_argument("--data", type=Path, default=default)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="torch seed (weights' head, order, flips)")
    p.add_argument("--limit", type=int, default=None, help="images per folder (smoke runs)")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    if not (a.data / "Training").is_dir():
        p.error(f"--data {a.data}: no Training/ folder (set FEDSCAN_DATA or pass --data)")
    res = run_plain(a.data, size=a.size, epochs=a.epochs, limit=a.limit, seed=a.seed)
    print(f"plain: Testing/ accuracy {100 * res['accuracy']:.2f} % in {res['seconds']:.0f} s")
    if a.out:
        a.out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
