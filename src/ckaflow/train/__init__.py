"""Training: one module per method (simclr, supervised), a shared loop (`loop.train_run`),
checkpoints."""
