"""simclr-dist: distributed SimCLR pretraining on Ray Train, with evaluation, ablations and monitoring."""

__version__ = "0.1.0"
