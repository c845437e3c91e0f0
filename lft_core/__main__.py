"""Entry point: ``python -m lft_core <command>`` (see lft_core.run.cli)."""
import sys

from lft_core.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
