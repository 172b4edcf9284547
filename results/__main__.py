"""`python -m results ls|show|best|trials|wandb`: browse a results store (see results/browse.py)."""
import sys

from results.browse import main

sys.exit(main())
