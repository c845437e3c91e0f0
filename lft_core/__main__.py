"""Entry point: ``python -m lft_core <command>`` (see lft_core.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
