"""Checkpoints (format, save/load/verify, list/latest), model weights (build_model, state-dict mapping, importers of
published encoders) and the fault drills that act on storage. Imports nothing else of run/."""
