"""`vcc demo` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def demo(ctx: typer.Context) -> None:
        """Not implemented yet."""
        from vcc.core.errors import NotImplementedYet

        raise NotImplementedYet("`vcc demo` is not implemented yet")
