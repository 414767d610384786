"""Where the files that ship with dicomnode are found: the default config, the models, the
database migrations.

In a source checkout they are the top-level ``config/``, ``models/`` and ``db/`` folders; an
installed wheel carries copies under ``dicomnode/_shipped/`` (``setup.py`` puts them there).
``DICOMNODE_MODELS_DIR`` (or ``models_dir`` in the config) points at another models folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

__all__ = ["example_data_dir", "models_dir", "shipped"]

_PACKAGE = Path(__file__).resolve().parent

Shipped = Literal["config", "models", "db"]


def shipped(name: Shipped) -> Path:
    """The shipped folder ``name``: the wheel's copy if installed, else the checkout's.

    Raises
    ------
    FileNotFoundError
        Neither an installed copy nor a source checkout holds it.
    """
    for candidate in (_PACKAGE / "_shipped" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"dicomnode's {name}/ folder is missing from this installation")


def models_dir() -> Path:
    """The models folder when the config names none: ``DICOMNODE_MODELS_DIR`` or the shipped one."""
    override = os.environ.get("DICOMNODE_MODELS_DIR")
    return Path(override) if override else shipped("models")


def example_data_dir() -> Path:
    """Real scanner DICOM for the demo, the tests and the simulator's CT cases:
    ``DICOMNODE_TEST_DATA``, else ``shared/data`` beside the checkout (it may not exist)."""
    override = os.environ.get("DICOMNODE_TEST_DATA")
    return Path(override) if override else _PACKAGE.parent.parent / "shared" / "data"
