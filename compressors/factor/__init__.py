"""Weight factorisation: low-rank layers fitted to their calibration inputs."""
