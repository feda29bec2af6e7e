"""3D MobileNetV2 of Köpüklü et al., "Resource Efficient 3D Convolutional Neural Networks" (ICCVW 2019).

Follows okankop/Efficient-3DCNNs: a (1,2,2)-strided 3x3x3 stem, inverted residual blocks with
3x3x3 depthwise convolutions (four stages downsample space and time), a 1x1x1 conv to 1280
channels, global average pooling, dropout 0.2 and a linear classifier. Module names match that
repository (``features.*``, ``classifier.1``) so its weights load through ``--init``.
"""

from __future__ import annotations

import torch
from torch import nn

from vcc.core.errors import UsageError
from vcc.core.models.registry import register_model

# t (expansion), c (channels), n (blocks), s (stride of the first block)
_SETTING = [
    (1, 16, 1, (1, 1, 1)),
    (6, 24, 2, (2, 2, 2)),
    (6, 32, 3, (2, 2, 2)),
    (6, 64, 4, (2, 2, 2)),
    (6, 96, 3, (1, 1, 1)),
    (6, 160, 3, (2, 2, 2)),
    (6, 320, 1, (1, 1, 1)),
]


def _conv_bn(cin: int, cout: int, kernel: int, stride: tuple[int, int, int] | int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv3d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm3d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class InvertedResidual3D(nn.Module):
    """1x1x1 expand (skipped when t=1), 3x3x3 depthwise, 1x1x1 linear projection; residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int], expand_ratio: int) -> None:
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_res_connect = tuple(stride) == (1, 1, 1) and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += _conv_bn(cin, hidden, 1)
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, act=False)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2_3D(nn.Module):
    """3D MobileNetV2 for (N, 3, T, H, W) clips; `width_mult` scales every width but the last (if < 1)."""

    def __init__(self, num_classes: int, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        if not width_mult > 0:
            raise UsageError(f"width_mult must be > 0, not {width_mult}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), not {dropout}")
        cin = max(1, int(32 * width_mult))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        features: list[nn.Module] = [nn.Sequential(*_conv_bn(3, cin, 3, (1, 2, 2)))]
        for t, c, n, s in _SETTING:
            cout = max(1, int(c * width_mult))
            for i in range(n):
                features.append(InvertedResidual3D(cin, cout, s if i == 0 else (1, 1, 1), t))
                cin = cout
        features.append(nn.Sequential(*_conv_bn(cin, self.last_channel, 1)))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[str]:
        """Ends of the 24-, 32-, 96-channel stages and the final 1x1x1 conv."""
        return ["features.3", "features.6", "features.13", "features.18"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled final features, (N, last_channel)."""
        return self.avgpool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


# The class is its own builder: its keyword arguments are the arch options.
register_model(
    "mobilenetv2_3d",
    family="mobilenetv2_3d",
    frames=16,
    size=112,
    description="3D MobileNetV2 (Köpüklü et al. 2019); options: width_mult (1.0), dropout (0.2)",
)(MobileNetV2_3D)
