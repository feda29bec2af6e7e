"""`vcc eval` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def eval_(ctx: typer.Context) -> None:
        """Not implemented yet."""
        from vcc.core.errors import NotImplementedYet

        raise NotImplementedYet("`vcc eval` is not implemented yet")
