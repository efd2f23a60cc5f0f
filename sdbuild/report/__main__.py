"""`python -m sdbuild.report SWEEP_DIR`."""

import sys

from . import main

sys.exit(main())
