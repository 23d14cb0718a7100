"""Allow ``python -m dpe_export``."""

import sys

from dpe_export.cli import main

if __name__ == "__main__":
    sys.exit(main())
