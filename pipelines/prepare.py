"""DVC stage `prepare` (see dvc.yaml): a thin entry point to `egat prepare`."""

import sys

from egat.cli import main

if __name__ == "__main__":
    main(["prepare", *sys.argv[1:]])
