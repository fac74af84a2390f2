"""DVC stage `train` (see dvc.yaml): one (method, domain, seed) cell through the one Trainer."""

import sys

from egat.cli import main

if __name__ == "__main__":
    main(["train-cell", *sys.argv[1:]])
