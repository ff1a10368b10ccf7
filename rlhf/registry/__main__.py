"""``python -m rlhf.registry ...`` runs the same CLI as ``rlhf registry ...``."""

import sys

from rlhf.cli import main

sys.exit(main(["registry", *sys.argv[1:]]))
