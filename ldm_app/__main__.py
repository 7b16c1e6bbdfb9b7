"""`python -m ldm_app ...` is the `ldm-app` command."""

from .cli import main

main()
