"""DVC stage `report` (see dvc.yaml): every eval.json -> tables, figures, metrics.json, plot data."""

import sys

from egat.cli import main

if __name__ == "__main__":
    main(["report", *sys.argv[1:]])
