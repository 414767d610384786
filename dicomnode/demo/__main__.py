"""``python -m dicomnode.demo``."""

import sys

from dicomnode.demo.run import main

sys.exit(main())
