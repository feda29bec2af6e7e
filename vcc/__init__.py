"""vcc: compress video action-recognition networks (prune, VIB, early exits) and measure them honestly."""

__version__ = "0.1.0"
