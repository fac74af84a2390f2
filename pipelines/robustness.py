"""DVC stage `robustness` (see dvc.yaml): AutoAttack and the masking checklist on one cell."""

import sys

from egat.cli import main

if __name__ == "__main__":
    main(["robustness-cell", *sys.argv[1:]])
