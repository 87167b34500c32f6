"""The modules of the zoo's small residual network (`codec.models.zoo.resnet`), kept apart from zoo.py
because they import torch at module level (zoo.py defers torch so the CLI can list architectures fast).

They are module-level classes, so a built network pickles and deep-copies like any torch module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """He et al.'s basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is the input itself, or a 1x1 convolution + BN where the block changes the width or
    (stride 2) halves the map."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """Stem (conv3x3-BN-ReLU), one stage per width (the first at stride 1, the others at stride 2), global
    average pooling, a linear layer to logits."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks_per_stage: int, num_outputs: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, previous = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(previous, width, 2 if stage > 0 and block == 0 else 1))
                previous = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))
