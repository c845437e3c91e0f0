"""Running the CLI in-process the way a shell would see it (shared by the hardening and reliability tests)."""
from __future__ import annotations

from lft_core.run.cli import main


def run_cli(argv: list, capsys) -> tuple[int, str]:
    """``python -m lft_core *argv`` in this process: (exit status, what it printed on stderr). Argparse's usage
    errors (SystemExit) count as their status."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr().err
