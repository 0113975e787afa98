"""`python -m chatstream_lite`: the server (cli.py)."""

import sys

from .cli import main

__all__: list[str] = []

sys.exit(main())
