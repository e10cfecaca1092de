"""Training: Lightning trainers, losses, EMA, learning-rate schedules and the training-config schema."""
