#!/usr/bin/env python3
"""Drop-in for the CompVis ``scripts/img2img.py``: same flags, runs ``sdgen img2img``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli.app import main  # noqa: E402

if __name__ == "__main__":
    main(["img2img", *sys.argv[1:]])
