"""DVC stage `evaluate` (see dvc.yaml): test one trained cell on every domain."""

import sys

from egat.cli import main

if __name__ == "__main__":
    main(["evaluate-cell", *sys.argv[1:]])
