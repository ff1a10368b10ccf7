"""``python -m rlhf.dashboard serve|report ...``"""

import sys

from rlhf.dashboard.cli import main

sys.exit(main())
