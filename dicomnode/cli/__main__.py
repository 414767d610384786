"""``python -m dicomnode.cli``."""

from dicomnode.cli import main

main()
