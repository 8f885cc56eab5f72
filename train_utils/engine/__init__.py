"""The training engine: command-line flags, the Trainer and its steps, one epoch, schedules,
distributed helpers and the run log."""
