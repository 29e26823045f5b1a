"""The errors a user can cause or fix; the CLI prints their message as one line and exits non-zero."""


class GpuRunError(Exception):
    """Base of every error whose message tells the user what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(GpuRunError):
    """gpu-run.toml, a host entry or a command-line value is wrong."""


class DatasetError(GpuRunError):
    """The dataset folder does not have the ImageFolder layout or its images are unreadable."""


class BackendError(GpuRunError):
    """The place a container should run (an engine, a host) cannot do what was asked."""


class Unreachable(BackendError):
    """The machine does not answer (yet): worth waiting for while an instance boots."""


class RunNotFound(GpuRunError):
    """A run id that is not in the ledger."""
