#!/usr/bin/env python3
"""Train a model with nanocolor: `python train.py --help`. The code is nanocolor/train.py, also run
as `nanocolor train` or `python -m nanocolor train`."""
import sys

from nanocolor.train import main

if __name__ == "__main__":
    sys.exit(main())
