"""`python -m sweep`: see `sweep.cli`."""
import sys
from pathlib import Path

# `python -m` puts the working directory first on sys.path. A `results/` folder there (the default results
# dir of runs started from that directory) would shadow the `results` package of an editable install as an
# empty namespace package, so the package's own checkout goes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
