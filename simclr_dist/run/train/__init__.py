"""The training steps and the two per-worker loops (pretraining, classifier training), resume bookkeeping, metrics
and the evaluation protocols the loops call. Imports run.store only."""
