"""Packaging hook: a wheel carries the shipped config/, models/ and db/ folders.

They stay top-level folders in the checkout (IT admins and model trainers work there); a
built wheel copies them under ``dicomnode/_shipped/``, where :mod:`dicomnode.resources`
finds them. An editable install reads the checkout's folders directly.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("config", "models", "db")
ROOT = Path(__file__).resolve().parent


class BuildWithShipped(build_py):
    """build_py that also copies the shipped folders into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in SHIPPED:
            shutil.copytree(ROOT / name, Path(self.build_lib) / "dicomnode" / "_shipped" / name,
                            dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithShipped})
