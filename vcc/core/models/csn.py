"""Channel-Separated Networks (Tran, Wang, Feiszli, Torresani, ICCV 2019): ir-CSN and ip-CSN.

Bottleneck 3D ResNets (depth 26: 2-2-2-2 blocks, 50: 3-4-6-3, 101: 3-4-23-3, 152: 3-8-36-3) whose
3x3x3 middle convolution is channel-separated:

* ir-CSN (interaction-reduced): the 3x3x3 conv becomes a 3x3x3 depthwise conv;
* ip-CSN (interaction-preserved): a 1x1x1 conv (+BN) followed by a 3x3x3 depthwise conv.

Built like facebookresearch/VMZ (``pt/vmz/models``): torchvision's VideoResNet with a
3x7x7 stem + 1x3x3 max pool and BatchNorm eps 1e-3, so module names follow VMZ's checkpoints.
"""

from __future__ import annotations

import functools

from torch import nn

from vcc.core.models.registry import register_model
from vcc.core.models.torchvision_video import VideoResNetX

_DEPTHS = {26: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class StemPool(nn.Sequential):
    """3x7x7 conv (stride 1,2,2), BN, ReLU, 1x3x3 max pool (stride 1,2,2)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv3d(3, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )


class Conv3DDepthwise(nn.Conv3d):
    """3x3x3 depthwise convolution (ir-CSN's middle conv)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1, padding: int = 1) -> None:
        if in_planes != out_planes:
            raise ValueError("a depthwise conv keeps its channel count")
        super().__init__(in_planes, out_planes, kernel_size=3, stride=stride, padding=padding, groups=in_planes, bias=False)

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class IPConv3DDepthwise(nn.Sequential):
    """1x1x1 conv + BN, then 3x3x3 depthwise (ip-CSN's middle conv)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1, padding: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_planes, out_planes, kernel_size=1, bias=False),
            nn.BatchNorm3d(out_planes),
            Conv3DDepthwise(out_planes, out_planes, None, stride, padding),
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


def csn(kind: str, depth: int, num_classes: int, dropout: float = 0.0) -> VideoResNetX:
    """An ir- or ip-CSN of the given depth."""
    from torchvision.models.video.resnet import Bottleneck

    maker = Conv3DDepthwise if kind == "ir" else IPConv3DDepthwise
    model = VideoResNetX(Bottleneck, [maker] * 4, _DEPTHS[depth], StemPool, num_classes, dropout=dropout)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eps = 1e-3
    return model


for _kind, _what in (("ir", "3x3x3 depthwise"), ("ip", "1x1x1 conv + 3x3x3 depthwise")):
    for _depth in _DEPTHS:
        register_model(
            f"{_kind}_csn_{_depth}",
            family="csn",
            frames=16 if _depth < 152 else 32,
            size=112 if _depth < 152 else 224,
            description=f"{_kind}-CSN-{_depth} (Tran et al. 2019; bottleneck middle conv = {_what}); options: dropout",
        )(functools.partial(csn, _kind, _depth))
