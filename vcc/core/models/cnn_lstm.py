"""CNN-LSTM: a per-frame 2D backbone, an LSTM over the frame features, a linear classifier.

The structure the VIB code relies on (shared with ``lstm_e2e``)::

    model.backbone      2D net, (N*T, 3, H, W) -> (N*T, F)
    model.feature_dim   int F
    model.lstm          nn.LSTM(F, hidden_size, num_layers, batch_first=True)
    model.fc            nn.Linear(hidden_size, num_classes)
    model.features(x)   (N, 3, T, H, W) -> (N, T, F)
    model.head(seq)     (N, T, F) -> logits: LSTM, then fc on the last time step
    model(x)            head(features(x))

Backbones are torchvision's ImageNet classifiers with their last layer removed (built with
``weights=None``; ImageNet weights only from a user file through ``--init``), or ``tiny``, a
small 2D CNN for tests and CPU demos.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vcc.core.errors import UsageError
from vcc.core.models.registry import register_model


class SequenceClassifier(nn.Module):
    """Base: per-frame features -> LSTM -> fc on the last step. Subclasses set ``feature_dim`` and define ``features``."""

    feature_dim: int

    def _init_head(self, num_classes: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        if hidden_size < 1 or num_layers < 1:
            raise UsageError(f"hidden_size and num_layers must be >= 1, not {hidden_size} and {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), not {dropout}")
        self.lstm = nn.LSTM(self.feature_dim, hidden_size, num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(hidden_size, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, seq: torch.Tensor) -> torch.Tensor:
        """(N, T, F) features -> (N, num_classes) logits from the LSTM's last time step."""
        out, _ = self.lstm(seq)
        return self.fc(self.dropout(out[:, -1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyCNN2D(nn.Sequential):
    """Three strided 3x3 conv-BN-ReLU layers (16, 32, 32 channels), then a `grid` x `grid` average pool.

    Keeping a coarse spatial grid (not a global pool) lets the LSTM see where things are in
    each frame, so it can learn motion (direction, trajectory) from the sequence of features.
    """

    def __init__(self, width: int = 16, grid: int = 4) -> None:
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, width * 2, width * 2):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(grid), nn.Flatten(1)]
        super().__init__(*layers)
        self.dim = cin * grid * grid


def _resnet18() -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    m = resnet18(weights=None)
    dim = m.fc.in_features
    m.fc = nn.Identity()
    return m, dim


def _mobilenet_v2() -> tuple[nn.Module, int]:
    from torchvision.models import mobilenet_v2

    m = mobilenet_v2(weights=None)
    dim = m.last_channel
    m.classifier = nn.Identity()
    return m, dim


def _efficientnet_b0() -> tuple[nn.Module, int]:
    from torchvision.models import efficientnet_b0

    m = efficientnet_b0(weights=None)
    dim = m.classifier[1].in_features
    m.classifier = nn.Identity()
    return m, dim


def _inception_v3() -> tuple[nn.Module, int]:
    from torchvision.models import inception_v3

    m = inception_v3(weights=None, aux_logits=False, init_weights=True)
    dim = m.fc.in_features
    m.fc = nn.Identity()
    return m, dim


def _tiny() -> tuple[nn.Module, int]:
    m = TinyCNN2D()
    return m, m.dim


BACKBONES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "resnet18": _resnet18,
    "mobilenet_v2": _mobilenet_v2,
    "efficientnet_b0": _efficientnet_b0,
    "inception_v3": _inception_v3,  # needs frames of at least 75x75 pixels
    "tiny": _tiny,
}


class CNNLSTM(SequenceClassifier):
    """Per-frame 2D CNN features -> LSTM -> linear classifier on the last step."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        hidden_size: int = 128,
        num_layers: int = 1,
        freeze_backbone: bool = False,
        dropout: float = 0.0,
        motion: bool = False,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise UsageError(f"unknown cnn_lstm backbone {backbone!r}; known: {', '.join(BACKBONES)}")
        self.backbone_name = backbone
        self.backbone, self.feature_dim = BACKBONES[backbone]()
        self.motion = bool(motion)
        if self.motion:
            self.feature_dim *= 2
        self.freeze_backbone = bool(freeze_backbone)
        self._init_head(num_classes, hidden_size, num_layers, dropout)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> CNNLSTM:
        """As nn.Module.train, but a frozen backbone stays in eval mode (fixed BN statistics)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) clips -> (N, T, F) per-frame backbone features."""
        n, c, t, h, w = x.shape
        if self.backbone_name == "inception_v3" and min(h, w) < 75:
            raise UsageError(f"the inception_v3 backbone needs frames of at least 75x75 pixels, got {h}x{w}")
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        feats = self.backbone(frames).reshape(n, t, -1)
        if self.motion:
            # [f_t, f_t - f_(t-1)] for t = 1..T-1: the LSTM sees how each frame's features change.
            if t < 2:
                raise UsageError("cnn_lstm with motion=true needs clips of at least 2 frames")
            feats = torch.cat([feats[:, 1:], feats[:, 1:] - feats[:, :-1]], dim=2)
        return feats


# The class is its own builder: its keyword arguments are the arch options.
register_model(
    "cnn_lstm",
    family="cnn_lstm",
    frames=16,
    size=112,
    description="per-frame 2D CNN -> LSTM; options: backbone resnet18|mobilenet_v2|efficientnet_b0|inception_v3|tiny, hidden_size (128), num_layers (1), freeze_backbone, dropout, motion (feed [f_t, f_t - f_t-1])",
)(CNNLSTM)
