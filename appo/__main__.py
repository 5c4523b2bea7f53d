"""`python -m appo train ...` is `appo train ...`."""

import sys

from appo.cli import main

sys.exit(main())
