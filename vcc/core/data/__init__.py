"""Datasets: preparation (`vcc prepare`), manifests and the decord clip loader."""
