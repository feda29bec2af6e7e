"""3D ResNets of Hara et al. (CVPR 2018), depths 10/18/34/50/101, shortcut A or B; and r3d_tiny."""

from __future__ import annotations

import functools

import torch
from torch import nn

from vcc.core.errors import UsageError
from vcc.core.models.registry import register_model


def _conv3x3(cin: int, cout: int, stride: int | tuple[int, int, int] = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: spatio-temporal subsampling, then `pad_channels` zero channels."""

    def __init__(self, stride: int | tuple[int, int, int], pad_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st, sh, sw = self.stride if isinstance(self.stride, tuple) else (self.stride,) * 3
        if (st, sh, sw) != (1, 1, 1):
            x = x[:, :, ::st, ::sh, ::sw]
        if self.pad_channels > 0:
            n, _, t, h, w = x.shape
            x = torch.cat([x, x.new_zeros(n, self.pad_channels, t, h, w)], dim=1)
        return x


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int | tuple[int, int, int] = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int | tuple[int, int, int] = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet3D(nn.Module):
    """Hara et al.'s 3D ResNet for (N, 3, T, H, W) clips."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int,
        shortcut: str = "B",
        base_width: int = 64,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 1,
        no_max_pool: bool = False,
        dropout: float = 0.0,
        conv1_s_size: int = 7,
        t_stride: int = 2,
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise UsageError(f"shortcut must be 'A' or 'B', not {shortcut!r}")
        if base_width < 1 or not 0.0 <= dropout < 1.0:
            raise UsageError(f"base_width must be >= 1 and dropout in [0, 1), not {base_width} and {dropout}")
        if conv1_s_size < 1 or conv1_s_size % 2 == 0 or t_stride not in (1, 2):
            raise UsageError(f"conv1_s_size must be odd and >= 1 and t_stride 1 or 2, not {conv1_s_size} and {t_stride}")
        widths = [base_width, base_width * 2, base_width * 4, base_width * 8]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv3d(
            3,
            widths[0],
            kernel_size=(conv1_t_size, conv1_s_size, conv1_s_size),
            stride=(conv1_t_stride, 2, 2),
            padding=(conv1_t_size // 2, conv1_s_size // 2, conv1_s_size // 2),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        # t_stride=1 keeps every frame through the max pool and layers 2-4 (they halve space only),
        # so the stages' MACs stay balanced (channels x2, positions /4) and early exits are cheap.
        down = 2 if t_stride == 2 else (1, 2, 2)
        self.maxpool = nn.Identity() if no_max_pool else nn.MaxPool3d(kernel_size=3, stride=down, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0], shortcut, 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], shortcut, down)
        self.layer3 = self._make_layer(block, widths[2], layers[2], shortcut, down)
        self.layer4 = self._make_layer(block, widths[3], layers[3], shortcut, down)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, shortcut: str, stride: int | tuple[int, int, int]) -> nn.Sequential:
        downsample: nn.Module | None = None
        out = planes * block.expansion
        if stride != 1 or self.in_planes != out:
            if shortcut == "A":
                downsample = ShortcutA(stride, out - self.in_planes)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.in_planes, out, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm3d(out),
                )
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = out
        layers += [block(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self) -> list[str]:
        """Names of the stages after which early exits can attach."""
        return ["layer1", "layer2", "layer3", "layer4"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


_DEPTHS = {
    10: (BasicBlock, [1, 1, 1, 1]),
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}


def _register(name: str, depth: int, description: str, frames: int = 16, size: int = 112, **defaults) -> None:
    """Register ResNet3D with depth `depth`'s block and layers; `defaults` override its keyword defaults.

    The partial is the builder: its signature (ResNet3D's, with these defaults) gives the arch
    options and their types, so no signature is copied.
    """
    block, layers = _DEPTHS[depth]
    register_model(name, family="resnet3d", frames=frames, size=size, description=description)(functools.partial(ResNet3D, block, layers, **defaults))


for _d in _DEPTHS:
    _register(
        f"resnet3d_{_d}",
        _d,
        f"3D ResNet-{_d} (Hara et al. 2018); options: shortcut A|B, base_width, dropout, conv1_s_size, t_stride",
        shortcut="B" if _d >= 50 else "A",
    )

# 3D ResNet-10 with base width 16 and a 3x7x7 stem. ``conv1_s_size=3, t_stride=1`` gives the
# early-exit friendly variant: a 3x3x3 stem and every frame kept to the end, so the four stages
# cost about the same and the first exit about 40% of the MACs (the default 3x7x7 stem alone is
# ~70% of them at 8x32x32).
_register(
    "r3d_tiny",
    10,
    "3D ResNet-10, base width 16, shortcut B: the small model for CPU demos and tests",
    frames=8,
    size=32,
    base_width=16,
    shortcut="B",
    conv1_t_size=3,
)
