"""Build the bundled example: a small CNN trained on scikit-learn's digits, exported to ONNX.

The network has what the graph rules care about: Conv + BatchNorm (kept in the export, so BN
folding has work to do), a residual Add, an Inception-style Concat with a MaxPool branch, pooling
and a Gemm head. Writes into examples/digits/:
  model.onnx   float model, opset 13, dynamic batch, BatchNormalization nodes kept
  calib.npz    {"input": [400, 1, 8, 8]} real training images for calibration
  eval.npz     {"input": [497, 1, 8, 8], "labels": [497]} held-out labeled test images

Usage: python tools/make_example.py [--out examples/digits] [--epochs 40]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16))
        self.res = nn.Sequential(*conv_bn(16, 16), nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.b1 = nn.Sequential(*conv_bn(16, 8, k=1))
        self.b2 = nn.Sequential(*conv_bn(16, 8))
        self.b3 = nn.MaxPool2d(3, 1, 1)
        self.post = nn.Sequential(nn.MaxPool2d(2), *conv_bn(32, 32))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)
        return self.head(self.post(x))


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = ((digits.images / 16.0 - 0.5) / 0.5).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1300], y[:1300], x[1300:], y[1300:]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "digits")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = DigitsNet()
    train(model, x_train, y_train, args.epochs, args.seed)
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.from_numpy(x_test[:2]),), str(args.out / "model.onnx"), input_names=["input"],
                      output_names=["logits"], opset_version=13, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      do_constant_folding=False, dynamo=False)
    np.savez(args.out / "calib.npz", input=x_train[:400])
    np.savez(args.out / "eval.npz", input=x_test, labels=y_test)
    print(f"float accuracy on {len(y_test)} test images: {acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
