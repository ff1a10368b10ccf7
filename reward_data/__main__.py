"""``python -m reward_data ...`` runs the same CLI as ``rlhf data ...``."""

import sys

from reward_data.cli import main

sys.exit(main(sys.argv[1:]))
