"""torchvision's video networks: r3d_18, mc3_18, r2plus1d_18 (Tran et al. 2018) and s3d (Xie et al. 2018).

The modules are torchvision's own (``Conv3DSimple``, ``Conv2Plus1D``, ``SepInceptionBlock3D``...),
so state dicts match torchvision's and its Kinetics weights load through ``--init``. Always built
with ``weights=None``: nothing is downloaded. Two small additions, neither with parameters:
an optional dropout before the classifier and ``stages()`` for early exits; s3d's fixed
(2, 7, 7) average pool shrinks to the feature map when the clip is smaller than 16x224x224.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vcc.core.errors import UsageError
from vcc.core.models.registry import register_model

# torchvision is imported inside the builders: it costs seconds, and most runs never need it.


def _check_dropout(dropout: float) -> float:
    if not 0.0 <= float(dropout) < 1.0:
        raise UsageError(f"dropout must be in [0, 1), not {dropout}")
    return float(dropout)


class VideoResNetX(nn.Module):
    """torchvision's VideoResNet (same modules and state-dict keys) plus dropout before ``fc`` and ``stages()``.

    `block`, `conv_makers`, `layers`, `stem` are VideoResNet's arguments; the network is built by
    torchvision's own constructor and its children adopted.
    """

    def __init__(
        self,
        block: type[nn.Module],
        conv_makers: list[type[nn.Module]],
        layers: list[int],
        stem: type[nn.Module],
        num_classes: int,
        zero_init_residual: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from torchvision.models.video.resnet import VideoResNet

        dropout = _check_dropout(dropout)
        tv = VideoResNet(block, conv_makers, layers, stem, num_classes=num_classes, zero_init_residual=zero_init_residual)
        self.stem = tv.stem
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.avgpool = tv.avgpool
        self.fc = tv.fc
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def stages(self) -> list[str]:
        """Names of the stages after which early exits can attach."""
        return ["layer1", "layer2", "layer3", "layer4"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled final features, (N, C)."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


_DESCRIPTIONS = {
    "r3d_18": "torchvision R3D-18 (3D ResNet-18, Tran et al. 2018); options: dropout",
    "mc3_18": "torchvision MC3-18 (mixed 3D/2D convolutions); options: dropout",
    "r2plus1d_18": "torchvision R(2+1)D-18 (factorised 2D+1D convolutions); options: dropout",
}


def _resnet_parts(name: str) -> tuple[list[type[nn.Module]], type[nn.Module]]:
    from torchvision.models.video import resnet as tvr

    if name == "r3d_18":
        return [tvr.Conv3DSimple] * 4, tvr.BasicStem
    if name == "mc3_18":
        return [tvr.Conv3DSimple] + [tvr.Conv3DNoTemporal] * 3, tvr.BasicStem
    return [tvr.Conv2Plus1D] * 4, tvr.R2Plus1dStem


def _video_resnet(name: str, num_classes: int, dropout: float = 0.0, zero_init_residual: bool = False) -> VideoResNetX:
    """torchvision's r3d_18, mc3_18 or r2plus1d_18 as a VideoResNetX."""
    from torchvision.models.video.resnet import BasicBlock

    makers, stem = _resnet_parts(name)
    return VideoResNetX(BasicBlock, makers, [2, 2, 2, 2], stem, num_classes, zero_init_residual, dropout)


for _name, _description in _DESCRIPTIONS.items():
    register_model(_name, family="torchvision", frames=16, size=112, description=_description)(functools.partial(_video_resnet, _name))


class ClampedAvgPool3d(nn.Module):
    """Average pool with stride 1 whose window shrinks to the input where the input is smaller.

    At s3d's natural 16x224x224 the feature map is 2x7x7 and this is exactly torchvision's
    ``AvgPool3d((2, 7, 7), stride=1)``; on smaller clips it becomes a global average.
    """

    def __init__(self, kernel_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = tuple(min(k, s) for k, s in zip(self.kernel_size, x.shape[-3:], strict=True))
        return F.avg_pool3d(x, kernel_size=k, stride=1)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class S3DX(nn.Module):
    """torchvision's S3D (same modules and state-dict keys; classifier: dropout + 1x1x1 Conv3d) with ``stages()``."""

    def __init__(self, num_classes: int = 400, dropout: float = 0.2) -> None:
        super().__init__()
        from torchvision.models.video.s3d import S3D

        tv = S3D(num_classes=num_classes, dropout=_check_dropout(dropout))
        self.features = tv.features
        self.avgpool = ClampedAvgPool3d((2, 7, 7))
        self.classifier = tv.classifier

    def stages(self) -> list[str]:
        """After Conv_2c (192 ch), Mixed_3c (480), Mixed_4f (832), Mixed_5c (1024)."""
        return ["features.3", "features.6", "features.12", "features.15"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return torch.mean(self.classifier(x), dim=(2, 3, 4))


# The class is its own builder: its keyword arguments are the arch options.
register_model(
    "s3d",
    family="torchvision",
    frames=16,
    size=224,
    description="torchvision S3D (separable 3D Inception, Xie et al. 2018); options: dropout (0.2)",
)(S3DX)
