"""Everything that talks to Ray or to storage: checkpoints, importers of published weights, the training steps and
the two per-worker loops (pretraining, classifier training), the TorchTrainer launcher, metrics and fault drills.
Imports data/, core/ and config; nothing here parses flags (that is the commands' job)."""
