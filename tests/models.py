"""The test zoo: small torch models covering the block types the graph rules must handle.

Each is exported with its BatchNorm nodes kept (do_constant_folding=False) and a dynamic batch
dimension; BN statistics are randomised so that folding is really exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

INPUT_SHAPE = (3, 16, 16)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 downsample on the skip path."""

    def __init__(self, cin: int = 3, cout: int = 8):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(cin, cout), nn.ReLU())
        self.body = nn.Sequential(*conv_bn(cout, 16, stride=2), nn.ReLU(), *conv_bn(16, 16))
        self.down = nn.Sequential(*conv_bn(cout, 16, k=1, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.body(x) + self.down(x)))


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1) with an identity skip."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16), nn.ReLU())
        self.body = nn.Sequential(*conv_bn(16, 4, k=1), nn.ReLU(), *conv_bn(4, 4), nn.ReLU(), *conv_bn(4, 16, k=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.body(x) + x))


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: expand, depthwise 3x3 with ReLU6, linear projection, skip."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU6())
        self.block = nn.Sequential(*conv_bn(8, 32, k=1), nn.ReLU6(), *conv_bn(32, 32, groups=32), nn.ReLU6(),
                                   *conv_bn(32, 8, k=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.block(x))


class InceptionConcat(nn.Module):
    """Inception-style block: 1x1, 3x3 and a MaxPool branch concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.b1 = nn.Sequential(*conv_bn(8, 8, k=1), nn.ReLU())
        self.b2 = nn.Sequential(*conv_bn(8, 8), nn.ReLU())
        self.b3 = nn.MaxPool2d(3, 1, 1)
        self.post = nn.Sequential(*conv_bn(24, 16, k=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.post(torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)))


class RegNetGroupConv(nn.Module):
    """RegNetX block: 1x1, grouped 3x3 (group width 8), 1x1, identity skip."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16), nn.ReLU())
        self.block = nn.Sequential(*conv_bn(16, 16, k=1), nn.ReLU(), *conv_bn(16, 16, groups=2), nn.ReLU(), *conv_bn(16, 16, k=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool, two 1x1 convs, sigmoid gate multiplied into the features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16), nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1), nn.Sigmoid())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x * self.se(x))


class GemmHead(nn.Module):
    """An MLP head: Linear + BatchNorm1d (folds into the Gemm) + ReLU + Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 4, stride=2), nn.ReLU(), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(4 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.mlp(self.stem(x))


class Deconv(nn.Module):
    """A decoder step: strided conv down, ConvTranspose (grouped) + BN back up, 1x1 output conv."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(*conv_bn(3, 8, stride=2), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, 2, groups=2, bias=True), nn.BatchNorm2d(8), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.up(self.down(x)))


class Attention(nn.Module):
    """A pre-norm transformer block on patches: LayerNorm, attention with softmax, GELU MLP, residuals."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.heads = heads

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


ZOO: dict[str, type[nn.Module]] = {
    "resnet_basic": BasicBlock,
    "resnet_bottleneck": Bottleneck,
    "mobilenetv2_block": InvertedResidual,
    "inception_concat": InceptionConcat,
    "regnet_group": RegNetGroupConv,
    "se_block": SqueezeExcite,
    "gemm_head": GemmHead,
    "conv_transpose": Deconv,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ZOO[name]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def export(model: nn.Module, path: Path, opset: int = 13) -> Path:
    x = torch.randn(2, *INPUT_SHAPE)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"], opset_version=opset,
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, do_constant_folding=False, dynamo=False)
    return path
