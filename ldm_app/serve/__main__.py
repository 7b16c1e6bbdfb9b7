"""`python -m ldm_app.serve ...`: `ldm-app serve` (the same command, flags and one-line errors) for environments
without the CLI entry point."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from ..cli import app

    app.main(["serve", *(sys.argv[1:] if argv is None else argv)], prog_name="ldm-app")


if __name__ == "__main__":
    main()
