"""Train the quickstart's feature network: a small CNN classifier of the digits (train split only).

    python scripts/train_feature_net.py                       # -> runs/digits_features/digits_cnn.pt
    python scripts/train_feature_net.py --epochs 2 --out /tmp/net.pt

Its penultimate layer (eval/digits_net.py) is the feature space of the quickstart's FID / precision /
recall / density / coverage (configs/features/digits.yaml). The split is the one of configs/data/digits.yaml
(same seed and held-out fraction), so neither this network nor the generative model has seen the
held-out digits that serve as the evaluation reference. Prints and stores the held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.digits import DigitsDataModule
from eval.digits_net import DigitsFeatureNet, save_digits_net
from models.cli import add_progress_flag, progress, reported


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/digits_features/digits_cnn.pt")
    p.add_argument("--image-size", type=int, default=16, help="must match data.image_size of the samples")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction (configs/data/digits.yaml)")
    p.add_argument("--seed", type=int, default=0, help="split seed (configs/data/digits.yaml: ${seed})")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--feature-dim", type=int, default=64)
    add_progress_flag(p)
    return p.parse_args(argv)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the side (edge padding) and a little pixel noise: generated digits
    are not centred exactly like the training ones."""
    b, c, s, _ = x.shape
    pad = max(1, s // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    ar = torch.arange(s)
    rows = (dy[:, None] + ar)[:, None, :, None]  # (B, 1, S, 1)
    cols = (dx[:, None] + ar)[:, None, None, :]  # (B, 1, 1, S)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return (out + 0.05 * torch.randn(out.shape, generator=g)).clamp(-1, 1)


@torch.no_grad()
def accuracy(net: DigitsFeatureNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return (net(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dm = DigitsDataModule(image_size=args.image_size, channels=1, val_fraction=args.val_fraction, seed=args.seed)
    (xt, yt), (xv, yv) = dm.split()
    net = DigitsFeatureNet(image_size=args.image_size, width=args.width, feature_dim=args.feature_dim)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(xt) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    bar = progress(range(args.epochs), unit="epoch", desc="feature net", enabled=args.progress)
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(xt), generator=g)
        for s in range(0, len(xt), args.batch_size):
            idx = perm[s : s + args.batch_size]
            loss = F.cross_entropy(net(augment(xt[idx], g)), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            acc = accuracy(net, xv, yv)
            bar.write(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    result = {
        "held_out_accuracy": accuracy(net, xv, yv),
        "train_accuracy": accuracy(net, xt, yt),
        "num_train": len(xt),
        "num_held_out": len(xv),
        "image_size": args.image_size,
        "val_fraction": args.val_fraction,
        "split_seed": args.seed,
        "epochs": args.epochs,
        "seconds": round(time.time() - start, 1),
    }
    path = save_digits_net(args.out, net, result)
    print(json.dumps(result, indent=2))
    print(f"saved {path} (configs/features/digits.yaml reads it as features.weights)")
    return {**result, "path": str(path)}


if __name__ == "__main__":
    with reported(writes="--out <file>"):
        main()
