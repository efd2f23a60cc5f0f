"""sdbuild's tuner as a Hydra sweeper plugin: `hydra/sweeper=ladder` (see ladder_sweeper.py)."""
