"""The training engine: command-line flags, the Trainer and its steps, one epoch, schedules and
the run log."""
