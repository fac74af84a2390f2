"""Set-up hook for the worker processes of egat's private local Ray cluster.

Deliberately light (logging only): Ray runs it in every worker process as it starts, before Ray
sets the process's OMP_NUM_THREADS, so importing torch here would fix torch's thread count at
the machine's core count in every worker (measured: 2 workers on 2 cores then ran 10x slower).
Hence its own module outside ``egat.train``, whose package imports the Trainer, and torch with it.
"""

import logging


def quiet_state_api() -> None:
    """The private cluster runs without the dashboard (it costs seconds of start-up and a port),
    so Ray Train's placement-group cleaner cannot reach the State API and would log a warning every second of
    every run. (egat frees what the cleaner would have freed: see
    ``egat.train.cluster.reap_orphan_placement_groups``.)"""
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)
