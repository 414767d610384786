"""dicomnode: a DICOM-native AI node for hospital PACS.

Data flow (one direction): receive -> spool -> assemble -> route -> jobs -> executors ->
pipelines -> write -> push, with every stage recorded in the audit database.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dicomnode")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
