"""`python -m edgeprism ...` is the `edgeprism` command (edgeprism.cli.main)."""

import sys

from edgeprism.cli.main import main

sys.exit(main())
