"""The vcc engine. No typer or rich imports below this package."""
