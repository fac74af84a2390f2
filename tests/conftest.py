"""Session-wide settings of the test suite."""

import os

# Ray clusters in the tests live on 127.0.0.1 only. Ray replaces a loopback address given to
# ray.init (and its nodes' own) with the machine's routable IP unless this is "0" (its switch
# for single-machine clusters), and a simulated cluster on 127.0.0.1 is then unreachable. Set
# before Ray is imported: Ray reads it once, at import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
