"""A sweep's round on its machine: the queue and its points written there in one go, the queue
started under the host's watchdog, and where each point is, read back in one round trip.

Each point is an ordinary run on the host (its own folder under runs/, the same trainer command a
single run uses, the same handle), except that the queue starts it when its turn comes, not the
laptop: the laptop may be gone by then. The watchdog holds the machine for the queue and stops it
once, when the queue has ended (or the budget ends it).
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from importlib import resources

from gpu_run.backends.base import Job, Prepared, RunHandle
from gpu_run.backends.ssh_host import SshHostBackend
from gpu_run.remote import quote
from gpu_run.watchdog.host import POLL_S as WATCHDOG_POLL_S

STOP_MARGIN_S = 30  # what the queue needs besides the trainer's own stop timeout to stop a point


@dataclass
class PointState:
    """One point as the host sees it: not started, running, or ended (with the queue's record)."""

    run_id: str
    started_at: float | None = None
    outcome: str | None = None
    exit_code: int | None = None
    ended_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    @property
    def started(self) -> bool:
        return self.started_at is not None


@dataclass
class QueueState:
    points: dict[str, PointState]
    exit_code: int | None  # the queue's own, once it has ended
    stop_state: str  # the watchdog's release so far ("" before the end)

    @property
    def ended(self) -> bool:
        return self.exit_code is not None


def _record(text: str) -> dict:
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


class HostQueue:
    """The files of one round under the host's runs/: the queue's own folder, and one per point."""

    def __init__(self, backend: SshHostBackend, queue_id: str):
        self.backend, self.queue_id = backend, queue_id
        self.dir = backend.run_dir(queue_id)
        self._files: dict[str, tuple[bytes, int]] = {}  # path under runs/ -> (content, mode)
        self._lines: list[str] = []

    def handle(self) -> RunHandle:
        """The queue's handle: what reconnects to it and confirms the machine's stop."""
        return RunHandle(
            backend="ssh", runtime=self.backend.runtime.name, run_dir=self.dir, versions=self.backend.runtime.versions()
        )

    def _put(self, run_id: str, name: str, text: str) -> None:
        self._files[f"{run_id}/{name}"] = (text.encode(), 0o644)

    def add_point(self, job: Job, prepared: Prepared, slot: int, est_s: int, env_file: str | None) -> RunHandle:
        """A point's scripts (written with the rest by send()); its handle, as a single run's."""
        backend, runtime = self.backend, self.backend.runtime
        run_dir = backend.run_dir(job.run_id)
        handle = RunHandle(
            backend=backend.name,
            runtime=runtime.name,
            run_dir=run_dir,
            out_dir=job.out_dir,
            container=f"gpu-run-{job.run_id}" if runtime.name == "docker" else "",
            keep_alive=job.keep_alive,
            terminate=job.terminate,
            device=prepared.device,
            versions=runtime.versions(),
        )
        self._put(job.run_id, "start.sh", runtime.start_command(job, run_dir, prepared, env_file) + "\n")
        self._put(job.run_id, "state.sh", runtime.state_command(handle) + "\n")
        self._put(job.run_id, "stop.sh", runtime.stop_command(handle, job.stop_timeout_s) + "\n")
        for name, command in (("logs.sh", runtime.logs_command(handle)), ("remove.sh", runtime.remove_command(handle))):
            if command:
                self._put(job.run_id, name, command + "\n")
        if backend.store is not None:  # the S3 path: each point's outputs go up as it ends
            uri = backend.store.uri(backend.store.run_prefix(job.run_id))
            self._put(job.run_id, "upload.sh", backend._s3sync("upload", uri, job.out_dir) + "\n")
        self._lines.append(f"{run_dir} {slot} {int(est_s)}")
        return handle

    def send(self, parallel: int, budget_s: int, point_max_s: int, silence_s: int) -> None:
        """Everything of the round in one tar over the connection (the points' folders exist:
        their env files are already there)."""
        settings = {"PARALLEL": parallel, "BUDGET_S": budget_s, "POINT_MAX_S": point_max_s, "SILENCE_S": silence_s}
        self._put(self.queue_id, "queue.env", "".join(f"{k}={int(v)}\n" for k, v in settings.items()))
        self._put(self.queue_id, "points", "".join(line + "\n" for line in self._lines))
        self._files[f"{self.queue_id}/queue.sh"] = (
            resources.files("gpu_run.sweep").joinpath("queue.sh").read_bytes(),
            0o755,
        )
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path, (content, mode) in self._files.items():
                info = tarfile.TarInfo(path)
                info.size, info.mode = len(content), mode
                tar.addfile(info, io.BytesIO(content))
        runs = f"{self.backend.workdir}/runs"
        self.backend.remote.run(f"mkdir -p {quote([runs])} && tar -C {quote([runs])} -xf -", input=buf.getvalue())

    def start(self, max_runtime_s: int, stop_timeout_s: int) -> None:
        """Hand the watchdog the queue as its job, then start the queue detached (its own session,
        so it outlives this connection; job.pgid/job.pid/exit_code as the process runtime keeps them)."""
        d = self.dir
        self.backend.watchdog.start_job(
            self.queue_id,
            {
                "WATCH": "process",
                "MAX_S": str(max_runtime_s),
                "SILENCE_S": "0",
                "STOP_TIMEOUT_S": str(stop_timeout_s + STOP_MARGIN_S),
                "POLL_S": str(WATCHDOG_POLL_S),
                "UPLOAD_COMMAND": "",
                "CLEANUP_COMMAND": f"sh {quote([d + '/queue.sh'])} {quote([d])} cleanup",
            },
        )
        wrapper = (
            f"sh {quote([d + '/queue.sh'])} {quote([d])} run & echo $! > {quote([d + '/job.pid'])}; wait $!; "
            f"echo $? > {quote([d + '/.exit_code'])} && mv {quote([d + '/.exit_code'])} {quote([d + '/exit_code'])}"
        )
        self.backend.remote.run(
            f"rm -f {quote([d + '/exit_code'])}; : > {quote([d + '/train.log'])}; "
            f"nohup setsid sh -c {quote([wrapper])} >> {quote([d + '/train.log'])} 2>&1 < /dev/null & "
            f"echo $! > {quote([d + '/job.pgid'])}"
        )


def read_state(backend: SshHostBackend, queue_id: str, run_ids: list[str], hold: bool = False) -> QueueState:
    """Every point's started_at and status, the queue's exit code and the watchdog's stop state,
    in one command. `hold`: a laptop that follows the sweep (and will pull each point) holds the
    machine's stop past the grace, as a single run's pull does; it lapses when the laptop goes."""
    runs = f"{backend.workdir}/runs"
    script = f"touch {quote([f'{runs}/{queue_id}/hold'])}; " if hold else ""
    script += "".join(
        f"printf '%s|%s|%s\\n' {quote([r])} \"$(cat {quote([f'{runs}/{r}/started_at'])} 2>/dev/null)\" "
        f'"$(cat {quote([f"{runs}/{r}/status"])} 2>/dev/null)"; '
        for r in run_ids
    )
    q = f"{runs}/{queue_id}"
    script += (
        f"printf 'queue|%s|%s\\n' \"$(cat {quote([q + '/exit_code'])} 2>/dev/null)\" "
        f'"$(cat {quote([q + "/stop_state"])} 2>/dev/null)"'
    )
    out = backend.remote.run(["sh", "-c", script], check=False).stdout
    points, exit_code, stop_state = {}, None, ""
    for line in out.splitlines():
        name, _, rest = line.partition("|")
        first, _, second = rest.partition("|")
        if name == "queue":
            exit_code = int(first) if first.strip().lstrip("-").isdigit() else None
            stop_state = second.strip()
            continue
        state = PointState(name)
        if first.strip().isdigit():
            state.started_at = float(first)
        record = _record(second)
        if "outcome" in record:
            state.outcome = record["outcome"]
            code = record.get("exit_code", "-1")
            state.exit_code = int(code) if code.lstrip("-").isdigit() else -1
            state.ended_at = float(record["ended_at"]) if record.get("ended_at", "").isdigit() else None
        points[name] = state
    return QueueState(points, exit_code, stop_state)


def stop_queue(backend: SshHostBackend, queue_id: str) -> bool:
    """SIGTERM to the queue: the running points save last.pth and stop, no more start. False when
    the queue had already ended."""
    d = backend.run_dir(queue_id)
    r = backend.remote.run(
        [
            "sh",
            "-c",
            f'p=$(cat {quote([d + "/job.pid"])} 2>/dev/null) && [ -n "$p" ] && '
            f'kill -0 "$p" 2>/dev/null && kill -TERM "$p"',
        ],
        check=False,
    )
    return r.code == 0
