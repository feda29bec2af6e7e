"""C3D (Tran, Bourdev, Fergus, Torresani, Paluri, ICCV 2015).

Eight 3x3x3 convolutions (64, 128, 256x2, 512x2, 512x2), five max pools (the first 1x2x2),
two 4096-wide fully connected layers with dropout 0.5, and the classifier. Module names follow
the common PyTorch port (``conv1 .. conv5b``, ``fc6 .. fc8``) so its Sports-1M weights load
through ``--init``. Two changes make small clips work without touching the 16x112x112 result:
the pools use ``ceil_mode`` (identical sizes at 16x112x112) and an adaptive average pool to
1x4x4 sits before fc6 (the identity at 16x112x112).
"""

from __future__ import annotations

import torch
from torch import nn

from vcc.core.errors import UsageError
from vcc.core.models.registry import register_model

_CONVS = [
    # name, in, out, pool after (name, kernel/stride, padding) or None
    ("conv1", 3, 64, ("pool1", (1, 2, 2), 0)),
    ("conv2", 64, 128, ("pool2", (2, 2, 2), 0)),
    ("conv3a", 128, 256, None),
    ("conv3b", 256, 256, ("pool3", (2, 2, 2), 0)),
    ("conv4a", 256, 512, None),
    ("conv4b", 512, 512, ("pool4", (2, 2, 2), 0)),
    ("conv5a", 512, 512, None),
    ("conv5b", 512, 512, ("pool5", (2, 2, 2), (0, 1, 1))),
]


class C3D(nn.Module):
    """C3D for (N, 3, T, H, W) clips; `fc_dim` is the width of fc6/fc7 (4096 in the paper)."""

    def __init__(self, num_classes: int, dropout: float = 0.5, fc_dim: int = 4096, batch_norm: bool = False) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), not {dropout}")
        if fc_dim < 1:
            raise UsageError(f"fc_dim must be >= 1, not {fc_dim}")
        self.batch_norm = batch_norm
        self._order: list[str] = []
        for name, cin, cout, pool in _CONVS:
            setattr(self, name, nn.Conv3d(cin, cout, kernel_size=3, padding=1))
            self._order.append(name)
            if batch_norm:
                bn = "bn" + name.removeprefix("conv")
                setattr(self, bn, nn.BatchNorm3d(cout))
                self._order.append(bn)
            self._order.append("relu")
            if pool is not None:
                pname, k, pad = pool
                setattr(self, pname, nn.MaxPool3d(kernel_size=k, stride=k, padding=pad, ceil_mode=True))
                self._order.append(pname)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 4, 4))
        self.fc6 = nn.Linear(512 * 16, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.fc8 = nn.Linear(fc_dim, num_classes)
        self.dropout = nn.Dropout(dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.005 if m is not self.fc8 else 0.01)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[str]:
        """After pool2 (128 ch), pool3 (256), pool4 (512), pool5 (512)."""
        return ["pool2", "pool3", "pool4", "pool5"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The fc7 features, (N, fc_dim)."""
        for name in self._order:
            x = torch.relu(x) if name == "relu" else getattr(self, name)(x)
        x = self.avgpool(x).flatten(1)
        x = self.dropout(torch.relu(self.fc6(x)))
        return self.dropout(torch.relu(self.fc7(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.forward_features(x))


# The class is its own builder: its keyword arguments are the arch options.
register_model(
    "c3d",
    family="c3d",
    frames=16,
    size=112,
    description="C3D (Tran et al. 2015); options: dropout (0.5), fc_dim (4096), batch_norm (off)",
)(C3D)
