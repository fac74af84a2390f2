"""A run on disk: where its files live and what they are called (:mod:`egat.run.layout`), what
its checkpoints hold (:mod:`egat.run.checkpoint`), and the device it computes on
(:mod:`egat.run.device`). Every other module asks these; none spells a run path itself."""
