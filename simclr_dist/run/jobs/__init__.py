"""Launching: connect to Ray, check capacity, run a TorchTrainer with a one-line failure; the pretraining job and
the classifier job (resolve, preflight, run). Imports run.train and run.store."""
