"""`vcc prepare` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("prepare", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def prepare(ctx: typer.Context) -> None:
        """Not implemented yet."""
        from vcc.core.errors import NotImplementedYet

        raise NotImplementedYet("`vcc prepare` is not implemented yet")
