"""Everything that talks to Ray or to storage, in sub-rooms that import downwards only:
store (checkpoints, weights, importers, fault drills) < train (steps, the two per-worker loops, metrics) <
jobs (the TorchTrainer launcher, capacity, the pretraining and classifier jobs) < eval, studies (evaluation of
checkpoints; experiments and sweeps). Imports data/, core/, config/ and report/; nothing here parses flags (that
is the commands' job)."""
