"""`python -m htsat_hf COMMAND ...`: the same as the installed `htsat-hf` command (`htsat_hf.commands.cli`)."""

import sys

from .commands.cli import main

sys.exit(main())
