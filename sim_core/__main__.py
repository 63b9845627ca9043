"""``python -m sim_core`` is the ``simbench`` command (handy under torchrun)."""
import sys

from sim_core.cli import main

sys.exit(main())
