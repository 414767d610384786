"""The command line: the only entry point. Every command touching node state takes --config.

Split by audience: :mod:`.node` (IT admins running a node), :mod:`.models` (the model registry
and offline runs) and :mod:`.research` (the simulator and training).
"""

from __future__ import annotations

import logging

import click

from dicomnode.cli import models, node, research

__all__ = ["main"]


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """dicomnode: a DICOM-native AI node for hospital PACS."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("apscheduler", "alembic", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)



for _command in (node.config, node.db, node.serve, node.rules, node.status, node.audit, node.trace, node.send,
                 node.echo, node.retry, node.purge, node.worker, models.models, models.run_offline, research.train,
                 research.simulate):
    main.add_command(_command)
