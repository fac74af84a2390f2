"""The lambda search as a script: ``python tune/search.py --config params.yaml --samples 16``.

The same as ``egat tune`` (egat/tune.py does the work); the best values land in
tune/best_params.yaml by default (``tune.best_params_file``).
"""

import sys

from egat.cli import main

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
