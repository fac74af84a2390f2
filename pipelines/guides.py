"""DVC stage `guides` (see dvc.yaml): a thin entry point to `egat guides`."""

import sys

from egat.cli import main

if __name__ == "__main__":
    main(["guides", *sys.argv[1:]])
