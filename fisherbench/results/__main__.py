"""`python -m fisherbench.results` (= `python -m fisherbench results`): see `fisherbench.results.browse`."""
import sys

from fisherbench.results.browse import main

if __name__ == "__main__":
    sys.exit(main())
