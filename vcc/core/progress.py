"""The progress callback that every long-running core function accepts (no torch import here)."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, "int | None", "dict | None"], None]
"""``progress(task, done, total, fields)``: `done` of `total` steps (None: unknown) of `task`, with
extra `fields` to show (loss, clips/s, ...). The CLI passes a rich progress bar; None means silent."""
