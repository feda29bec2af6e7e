"""`vcc wise` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("wise", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def wise(ctx: typer.Context) -> None:
        """Not implemented yet."""
        from vcc.core.errors import NotImplementedYet

        raise NotImplementedYet("`vcc wise` is not implemented yet")
