"""What every CLI module shares: the --config option, settings loading, the TLS options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dicomnode.settings import ConfigError, Settings, load_settings

__all__ = ["CONFIG_OPTION", "load_or_exit", "tls_options", "tls_or_exit"]

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


def tls_options(command: Any) -> Any:
    """--tls-cert / --tls-key / --tls-ca: DICOM TLS with mutual authentication (all three)."""
    for name, what in (("--tls-ca", "CA bundle that signed the peer's certificate"),
                       ("--tls-key", "this side's private key"),
                       ("--tls-cert", "this side's certificate")):
        command = click.option(name, type=click.Path(dir_okay=False, path_type=Path),
                               default=None, help=f"PEM: {what} (TLS).")(command)
    return command


def tls_or_exit(cert: Path | None, key: Path | None, ca: Path | None) -> Any:
    """The TLS client context of the three options, None when none is given; exit 2 naming
    what is missing or unreadable."""
    if cert is None and key is None and ca is None:
        return None
    from dicomnode.dicom.tls import client_context
    from dicomnode.settings import TLSFiles

    if cert is None or key is None or ca is None:
        raise click.UsageError("TLS needs --tls-cert, --tls-key and --tls-ca together")
    try:
        return client_context(TLSFiles(certificate=cert, private_key=key, ca_certificates=ca))
    except Exception as exc:
        raise click.UsageError(f"TLS: {exc}") from None
