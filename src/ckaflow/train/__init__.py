"""Training: one module per method (simclr, supervised), a shared loop, checkpoints."""

from ckaflow.train.loop import train_run

__all__ = ["train_run"]
