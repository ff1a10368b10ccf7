"""``python -m rlhf.registry ...`` runs the same CLI as ``rlhf registry ...``."""

import sys

from rlhf.registry.cli import main

sys.exit(main(sys.argv[1:]))
