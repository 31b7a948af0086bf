"""Evaluation jobs over checkpoints in storage (linear probe, kNN, fine-tuning; --watch) and their results store
beside the checkpoints. Imports run.jobs and below."""
