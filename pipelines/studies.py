"""DVC stage `studies` (see dvc.yaml): Tables III/IV and Figs. 3/4 from the runs and evaluations."""

import sys

from egat.cli import main

if __name__ == "__main__":
    main(["studies", *sys.argv[1:]])
