"""One module per sub-command: options -> core call -> render. Keep imports light (no torch)."""
