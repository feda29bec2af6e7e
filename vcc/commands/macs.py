"""`vcc macs` (not built yet)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("macs", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def macs(ctx: typer.Context) -> None:
        """Not implemented yet."""
        from vcc.core.errors import NotImplementedYet

        raise NotImplementedYet("`vcc macs` is not implemented yet")
