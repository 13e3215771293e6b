#!/usr/bin/env python3
"""Colorize photos with nanocolor: `python colorize.py --help`. The code is nanocolor/colorize.py, also run
as `nanocolor colorize` or `python -m nanocolor colorize`."""
import sys

from nanocolor.colorize import main

if __name__ == "__main__":
    sys.exit(main())
