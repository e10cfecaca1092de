"""``python -m ldm.cli ...`` runs the ``sdgen`` command (same as the console script)."""

from ldm.cli.app import main

main()
