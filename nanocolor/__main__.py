"""`python -m nanocolor COMMAND ...`: the same as the `nanocolor` command (see nanocolor/cli.py)."""
import sys

from .cli import main

sys.exit(main())
