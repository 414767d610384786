"""What every CLI module shares: the --config option and settings loading."""

from __future__ import annotations

from pathlib import Path

import click

from dicomnode.settings import ConfigError, Settings, load_settings

__all__ = ["CONFIG_OPTION", "load_or_exit"]

CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Settings YAML (default: the embedded config/dicomnode.yaml).",
)


def load_or_exit(config_path: Path | None) -> Settings:
    """The settings in ``config_path`` (the embedded defaults when None); a bad file exits 1
    with the error, which names the key."""
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

