"""`python -m fisherbench.sweep` (= `python -m fisherbench sweep`): see `fisherbench.sweep.cli`."""
import sys

from fisherbench.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
