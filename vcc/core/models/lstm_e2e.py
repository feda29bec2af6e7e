"""End-to-end LSTM over flattened small frames (the setting of Srivastava et al., WACV 2021).

Each frame is turned to grey (ITU-R BT.601 luma) if ``grayscale``, area-resized to
``frame_size`` x ``frame_size`` inside the model, and flattened; an LSTM reads the sequence and
a linear layer classifies its last step. Same structure as ``cnn_lstm`` (``lstm``, ``fc``,
``feature_dim``, ``features``, ``head``), without a backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vcc.core.errors import UsageError
from vcc.core.models.cnn_lstm import SequenceClassifier
from vcc.core.models.registry import register_model

_LUMA = (0.299, 0.587, 0.114)


class LSTME2E(SequenceClassifier):
    """LSTM over raw, downsized, flattened frames."""

    def __init__(self, num_classes: int, frame_size: int = 16, grayscale: bool = True, hidden_size: int = 128, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if frame_size < 1:
            raise UsageError(f"frame_size must be >= 1, not {frame_size}")
        self.frame_size = int(frame_size)
        self.grayscale = bool(grayscale)
        self.feature_dim = (1 if self.grayscale else 3) * self.frame_size**2
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1, 1), persistent=False)
        self._init_head(num_classes, hidden_size, num_layers, dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) clips -> (N, T, feature_dim) flattened small frames."""
        if self.grayscale:
            x = (x * self.luma.to(x.dtype)).sum(1, keepdim=True)
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        if (h, w) != (self.frame_size, self.frame_size):
            frames = F.adaptive_avg_pool2d(frames, self.frame_size)
        return frames.reshape(n, t, -1)


# The class is its own builder: its keyword arguments are the arch options.
register_model(
    "lstm_e2e",
    family="lstm_e2e",
    frames=16,
    size=32,
    description="end-to-end LSTM over flattened small frames (VIB paper); options: frame_size (16), grayscale (on), hidden_size (128), num_layers (1)",
)(LSTME2E)
