"""Commands on this machine, with the same interface as an SSH connection (gpu_run.remote.Remote),
so that a runtime drives the trainer the same way here and on a rented host."""

from __future__ import annotations

import getpass
import os
import subprocess
from dataclasses import dataclass

from gpu_run.errors import BackendError
from gpu_run.remote import Result, quote


@dataclass(frozen=True)
class LocalTarget:
    alias: str = "local"
    display: str = "this machine"
    user: str = getpass.getuser()


class _Stream:
    """A running command read like an SSH channel: its output lines, then its exit status."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def makefile(self, _mode: str = "rb"):
        return self.proc.stdout

    def recv_exit_status(self) -> int:
        return self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class LocalShell:
    """`sh -c` on this machine; a list is quoted, a string is a shell script built from quote()."""

    target = LocalTarget()

    def run(
        self,
        command: list[str] | str,
        input: bytes | None = None,
        check: bool = True,
        timeout_s: float | None = 300,
        env: dict[str, str] | None = None,
    ) -> Result:
        cmd = command if isinstance(command, str) else quote(command)
        try:
            proc = subprocess.run(
                ["sh", "-c", cmd],
                input=input or b"",
                capture_output=True,
                timeout=timeout_s,
                env={**os.environ, **(env or {})},
            )
        except subprocess.TimeoutExpired:
            raise BackendError(f"`{cmd[:120]}` did not finish within {timeout_s:.0f}s") from None
        result = Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))
        if check and result.code != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [f"exit code {result.code}"]
            raise BackendError(f"`{cmd[:120]}` failed: {last[0]}")
        return result

    def run_with_env(self, command: str, env: dict[str, str], **kwargs) -> Result:
        return self.run(command, env=env, **kwargs)

    def open(self, command: list[str] | str, timeout_s: float | None = None) -> _Stream:
        cmd = command if isinstance(command, str) else quote(command)
        return _Stream(
            subprocess.Popen(
                ["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        )

    def home(self) -> str:
        return os.path.expanduser("~")

    def expand(self, path: str, home: str) -> str:
        return os.path.expanduser(path)

    def close(self) -> None:
        """Nothing to close: there is no connection."""
