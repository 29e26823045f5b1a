"""The laptop's side of the watchdog on a host reached over SSH: lease, arm, watch it, confirm the stop.

The watchdog (watchdog.sh) runs on the host and owns the stop; the laptop only reads what it wrote
and, at the end, confirms for itself that the machine went down: a stop command that exited 0 on a
host that still answers is not a stop, and no money is recorded as saved until one is confirmed.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import threading
import time
from dataclasses import dataclass
from importlib import resources

import paramiko

from gpu_run.errors import GpuRunError
from gpu_run.providers.base import StopResult
from gpu_run.remote import Remote, quote
from gpu_run.ui import UI

POLL_S = 2  # how often the watchdog looks at the job
STOP_WAIT_S = 120  # after the grace: how long the laptop waits for the host to report its stop
# How long a host may go on answering after its stop command exited 0 before the stop counts as
# unconfirmed. Shutdown closes sshd within seconds; tests set it lower (GPU_RUN_STOP_CONFIRM_S).
STOP_CONFIRM_S = float(os.environ.get("GPU_RUN_STOP_CONFIRM_S", "60"))
FAILED_ATTEMPTS_REPORTED = 2  # a stop that failed this often is reported; the watchdog keeps trying
LEASE_RENEW_S = 30  # the laptop renews its setup lease this often
# A watchdog whose laptop has not renewed the setup lease this long releases the host (the laptop
# died or went offline mid-setup). Tests set it lower (GPU_RUN_SETUP_IDLE_S).
SETUP_IDLE_S = int(os.environ.get("GPU_RUN_SETUP_IDLE_S", "900"))
# A laptop that follows, stops or pulls a run holds the stop past the grace; it renews its hold
# every HOLD_RENEW_S while it works, so a hold older than HOLD_S means the laptop is gone
# (GPU_RUN_HOLD_S in tests). Renewing from the start of the follow, not from the job's end, is what
# keeps a busy laptop from losing the race against a short grace; a short HOLD_S is what keeps a
# laptop that died during training from costing more than the grace once the job ends.
HOLD_S = int(os.environ.get("GPU_RUN_HOLD_S", "10"))
HOLD_RENEW_S = max(1.0, HOLD_S / 3)
_DROPPED = (GpuRunError, paramiko.SSHException, OSError, EOFError)
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,9}")  # ASCII digits only, and few enough for an exit status


def whole_number(text: str | None) -> int | None:
    """A small whole number a host wrote (an exit code, an attempt count), or None for anything
    else ("abc", "", "1e9", 10**400 digits): the host's files are data, and a traceback is no answer."""
    return int(text) if text is not None and _WHOLE_NUMBER.fullmatch(text) else None


@dataclass(frozen=True)
class StopState:
    """One line of the watchdog's stop_state file: `KIND WALL_TIME [detail...]`."""

    kind: str
    at: float | None
    detail: str

    @property
    def attempt(self) -> int:
        """How often the stop failed; 0 when the watchdog wrote no number (nothing to report yet)."""
        for word in self.detail.split():
            if word.startswith("attempt="):
                return whole_number(word.split("=", 1)[1]) or 0
        return 0


def parse_stop_state(text: str) -> StopState | None:
    words = text.strip().split(" ", 2)
    if not words or not words[0]:
        return None
    try:
        at = float(words[1]) if len(words) > 1 else None
    except ValueError:
        at = None
    if at is not None and not math.isfinite(at):  # "nan" and "inf" are floats too, and no time
        at = None
    return StopState(words[0], at, words[2] if len(words) > 2 else "")


def stop_command_problem(remote: Remote, command: str) -> str | None:
    """Why the host's stop command cannot work there, or None: the program must exist, and a
    command that starts with sudo needs sudo without a password (the watchdog has no terminal)."""
    try:
        words = shlex.split(command)
    except ValueError as e:
        return f"the stop command {command!r} cannot be parsed ({e})"
    if not words:
        return "the stop command is empty"
    program, sudo = words[0], False
    if program == "sudo":
        sudo = True
        rest = [w for w in words[1:] if not w.startswith("-")]
        program = rest[0] if rest else ""
    if "=" in program or any(c in program for c in ";&|<>()$`"):
        return None  # shell syntax: nothing simple to check without running it
    checks = f"command -v -- {quote([program])} >/dev/null 2>&1 || echo 'missing {program}'; "
    if sudo:
        checks = (
            "command -v sudo >/dev/null 2>&1 || { echo 'missing sudo'; exit 0; }; "
            "sudo -n true >/dev/null 2>&1 || echo 'sudo needs a password'; "
        ) + checks
    out = remote.run(["sh", "-c", checks], check=False).stdout.strip()
    if not out:
        return None
    if out.startswith("missing sudo"):
        return "it uses sudo, which the host does not have"
    if "sudo needs a password" in out:
        return f"sudo asks {remote.target.user} for a password there (the watchdog has no terminal to type it)"
    return f"the program {program!r} is not on the host's PATH"


def reboot_rearm(remote: Remote) -> str:
    """What re-arms a run's watchdog after the host reboots (said by doctor)."""
    r = remote.run(["sh", "-c", "command -v crontab"], check=False)
    return "user crontab (@reboot)" if r.code == 0 and r.stdout.strip() else ""


class HostWatchdog:
    """The watchdog files of the runs under one host's workdir."""

    def __init__(self, remote: Remote, workdir: str, host_name: str, secrets_env: dict[str, str] | None = None):
        self.remote = remote
        self.workdir = workdir
        self.host_name = host_name
        self.secrets_env = secrets_env or {}  # what the watchdog's upload needs (S3 keys for the host)
        self._keeper: _Renewer | None = None
        self._holder: _Renewer | None = None  # this laptop's hold on a run's stop, renewed
        self._held = ""  # the run it holds

    def run_dir(self, run_id: str) -> str:
        return f"{self.workdir}/runs/{run_id}"

    def _file(self, run_id: str, name: str) -> str:
        return f"{self.run_dir(run_id)}/{name}"

    def _write(self, path: str, data: bytes, private: bool = False) -> None:
        umask = "umask 077; " if private else ""
        self.remote.run(f"{umask}cat > {quote([path])}", input=data)

    def _read(self, run_id: str, name: str, timeout_s: float = 15) -> str | None:
        r = self.remote.run(["cat", self._file(run_id, name)], check=False, timeout_s=timeout_s)
        return r.stdout if r.code == 0 else None

    # Before the job ------------------------------------------------------------------------------

    def claim(self, run_id: str, stop_command: str, keep_alive: bool, grace_s: int) -> None:
        """Hold the host for this run from its first step: ship the script and the host-wide
        settings and start the watchdog now, before the sync. It holds the host (a lease no other
        run's end stops it through) while the laptop renews the lease, and releases it when the
        laptop goes quiet; `start_job` hands it the job."""
        run_dir = self.run_dir(run_id)
        settings = {
            "WORKDIR": self.workdir,
            "STOP_COMMAND": stop_command or "none",
            "KEEP_ALIVE": "1" if keep_alive else "0",
            "GRACE_S": str(grace_s),
            "SETUP_IDLE_S": str(SETUP_IDLE_S),
            "HOLD_S": str(HOLD_S),
        }
        self.remote.run(["mkdir", "-p", run_dir])
        script = resources.files("gpu_run.watchdog").joinpath("watchdog.sh").read_bytes()
        self._write(f"{run_dir}/watchdog.sh", script)
        self._write(f"{run_dir}/host.env", "".join(f"{k}={quote([v])}\n" for k, v in settings.items()).encode())
        self.touch(run_id)
        self._start(run_id, "watch")
        self._keeper = _Renewer(lambda: self.touch(run_id), LEASE_RENEW_S)

    def touch(self, run_id: str) -> None:
        self.remote.run(f"echo setup > {quote([self._file(run_id, 'lease')])}", timeout_s=30)

    def _start(self, run_id: str, mode: str) -> None:
        """Start watchdog.sh detached: setsid + nohup + no inherited descriptors, so it outlives this
        SSH session and the laptop. Secrets (S3 keys) reach it as environment through stdin."""
        run_dir = self.run_dir(run_id)
        self.remote.run_with_env(
            f"nohup setsid sh {quote([run_dir + '/watchdog.sh'])} {quote([run_dir])} {mode} "
            f">> {quote([run_dir + '/watchdog.log'])} 2>&1 < /dev/null &",
            self.secrets_env,
        )

    def start_job(self, run_id: str, settings: dict[str, str]) -> None:
        """Hand the watchdog the job's settings, just before the trainer starts: it watches for the
        job from then on (a job that never appears counts as ended)."""
        env = "".join(f"{k}={quote([v])}\n" for k, v in settings.items())
        path = self._file(run_id, "watchdog.env")
        self._write(path + ".tmp", env.encode(), private=True)
        self.remote.run(["mv", "-f", path + ".tmp", path])
        self.stop_keeping()

    def stop_keeping(self) -> None:
        keeper = getattr(self, "_keeper", None)
        if keeper is not None:
            keeper.stop()
            self._keeper = None

    # While the job runs -------------------------------------------------------------------------

    def alive(self, run_id: str) -> bool:
        """The run's watchdog or its backstop process is alive (one restarts the other)."""
        run_dir = self.run_dir(run_id)
        script = " || ".join(
            f'{{ p=$(cat {quote([f"{run_dir}/{name}.pid"])} 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null '
            f"&& tr '\\0' ' ' < /proc/$p/cmdline | grep -qF -- {quote([run_dir])}; }}"
            for name in ("watchdog", "backstop")
        )
        return self.remote.run(["sh", "-c", script], check=False).code == 0

    def ensure(self, run_id: str, ui: UI) -> bool:
        """Start the watchdog again if it and its backstop were both killed; True when it had to."""
        state = self.stop_state(run_id)
        if state is not None and state.kind in ("stopped", "handed_over", "keep_alive", "not_needed"):
            return False
        if self.alive(run_id):
            return False
        ui.warn(f"the watchdog of {run_id} on {self.host_name} was not running: started it again")
        self._start(run_id, "watch")
        return True

    def status(self, run_id: str) -> dict | None:
        text = self._read(run_id, "status")
        return dict(item.split("=", 1) for item in text.split() if "=" in item) if text else None

    def stop_state(self, run_id: str) -> StopState | None:
        text = self._read(run_id, "stop_state")
        return parse_stop_state(text) if text else None

    def others(self, run_id: str) -> list[str]:
        """Other runs that still hold the host (their lease is live)."""
        r = self.remote.run(["sh", self._file(run_id, "watchdog.sh"), self.run_dir(run_id), "others"], check=False)
        return r.stdout.split() if r.code == 0 else []

    def hold(self, run_id: str) -> None:
        """A laptop is about to pull: the watchdog waits a little past the grace for it."""
        self.remote.run(["touch", self._file(run_id, "hold")])

    def attach(self, run_id: str) -> None:
        """This laptop follows the run and will pull it: its hold, renewed in the background until
        detach() (or until this process dies, which is how the watchdog learns the laptop is gone)."""
        self.hold(run_id)
        if self._holder is not None and self._held != run_id:
            self.detach()
        if self._holder is None:
            self._holder, self._held = _Renewer(lambda: self.hold(run_id), HOLD_RENEW_S), run_id

    def detach(self) -> None:
        """The laptop is done with the run: its hold lapses, the watchdog may release the host."""
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.stop()

    def mark_pulled(self, run_id: str) -> None:
        """The outputs are safe on the laptop: the watchdog may stop the host now, not after the grace."""
        self.detach()
        self.remote.run(["touch", self._file(run_id, "pulled")])

    # The end ---------------------------------------------------------------------------------------

    def abort(self, run_id: str) -> None:
        """Setup failed: end this run's watchers and let the host go (unless another run holds it)."""
        self.stop_keeping()
        self._start(run_id, "abort")

    def wait_for_release(self, run_id: str, grace_s: float, ui: UI) -> StopResult:
        """Follow the watchdog's release of the host to its end, and confirm a stop ourselves."""
        deadline = time.monotonic() + grace_s + STOP_WAIT_S
        last: StopState | None = None
        with ui.spinner(f"waiting for {self.host_name} to stop"):
            while time.monotonic() < deadline:
                try:
                    state = self.stop_state(run_id)
                except _DROPPED:
                    # The connection went as the release began: a shutdown takes sshd with it.
                    return self.confirm_down(last)
                last = state or last
                if state is None:
                    pass
                elif state.kind == "keep_alive":
                    return StopResult(True, "kept_alive", None, f"{self.host_name} is left running (keep-alive)")
                elif state.kind == "not_needed":
                    return StopResult(
                        True, "not_needed", state.at, f"{self.host_name} is never stopped (stop_command = none)"
                    )
                elif state.kind in ("handed_over", "waiting_for"):
                    other = state.detail.split()[0] if state.detail else "another run"
                    return StopResult(
                        True,
                        "handed_over",
                        state.at or time.time(),
                        f"run {other} still uses {self.host_name}; the host stops when it ends",
                    )
                elif state.kind == "stopped":
                    return self.confirm_down(state)
                elif state.kind == "stop_failed" and state.attempt >= FAILED_ATTEMPTS_REPORTED:
                    return StopResult(
                        False,
                        "failed",
                        None,
                        f"the stop command failed on {self.host_name} ({state.detail}); "
                        f"its watchdog keeps retrying, `gpu-run stop {run_id}` retries from here",
                    )
                time.sleep(1)
        shown = f"{last.kind} {last.detail}".strip() if last else "nothing"
        return StopResult(
            False,
            "unconfirmed",
            None,
            f"{self.host_name} did not report a stop within {grace_s + STOP_WAIT_S:.0f}s "
            f"(its watchdog reported: {shown}); it may still be billing",
        )

    def confirm_down(self, last: StopState | None) -> StopResult:
        """The machine counts as stopped once fresh logins fail, twice in a row."""
        self.remote.close()
        started = time.monotonic()
        failures = 0
        first_failure: float | None = None
        while True:
            try:
                self.remote.run(["true"], timeout_s=10)
                failures, first_failure = 0, None
            except _DROPPED:
                failures += 1
                first_failure = first_failure or time.time()
                if failures >= 2:
                    at = last.at if last is not None and last.kind == "stopped" and last.at else first_failure
                    return StopResult(True, "stopped", at, f"{self.host_name} stopped (it no longer answers)")
            finally:
                self.remote.close()
            if time.monotonic() - started >= STOP_CONFIRM_S:
                return StopResult(
                    False,
                    "unconfirmed",
                    None,
                    f"the stop command exited 0 but {self.host_name} still answers after "
                    f"{STOP_CONFIRM_S:.0f}s; it may still be billing",
                )
            time.sleep(1)


class _Renewer:
    """Renews something of the laptop's on the host in the background (the setup lease while it
    syncs and builds, steps that can take many minutes in one call; the hold while it follows and
    pulls); it dies with the laptop, which is the point."""

    def __init__(self, renew, every_s: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(renew, every_s), daemon=True)
        self._thread.start()

    def _run(self, renew, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                renew()
            except _DROPPED:
                pass  # the laptop's own step meets the dropped connection and says so

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
