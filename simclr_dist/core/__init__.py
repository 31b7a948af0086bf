"""The method itself, torch only: collectives with exact gradients, NT-Xent, ResNet + heads, LARS and schedules,
mixed precision, kNN and the logistic-regression probe. Nothing here knows about Ray, storage or configs, so every
piece is provable by a unit test in one process."""
