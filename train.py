"""`python train.py [overrides]` from a checkout: the same as `python -m fisherbench train` (see fisherbench/train.py)."""
from fisherbench.train import main

if __name__ == "__main__":
    main()
