"""gpu-run: run a containerized PyTorch training job on a rented GPU host, leave nothing running."""

__version__ = "0.1.0"


def train(*args, **kwargs):
    """gpu_run.api.train: the same launch as `gpu-run train`, from Python (imported when called,
    so that `import gpu_run` stays light)."""
    from gpu_run.api import train as _train

    return _train(*args, **kwargs)
