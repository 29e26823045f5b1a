"""gpu-run: run a containerized PyTorch training job on a rented GPU host, leave nothing running."""

__version__ = "0.1.0"
