"""Shared fixtures: an isolated GPU_RUN_HOME, generated datasets, the CLI as a user runs it, and
the test bed (Docker engine, sshd, moto), which must be there when GPU_RUN_REQUIRE_INTEGRATION=1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpu_run.demo_data import make_dataset

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_INTEGRATION = os.environ.get("GPU_RUN_REQUIRE_INTEGRATION") == "1"

# pytest loads this file as `conftest`; the test files import its helpers as `tests.conftest`. One
# module under both names, so that they share its state (which test is running).
sys.modules.setdefault("tests.conftest", sys.modules[__name__])


# Unit tests and the test bed ----------------------------------------------------------------------
# A test that needs the bed (Docker engine, sshd, moto, the files under .testbed) is marked
# `integration`; `make test-unit` runs the others, which must pass with no bed at all. To keep them
# honest, a unit test finds no engine (DOCKER_HOST points nowhere) and fails if it reads the bed.

NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
_integration_test = False  # whether the test being set up or run is marked integration


def pytest_runtest_setup(item) -> None:
    global _integration_test
    _integration_test = item.get_closest_marker("integration") is not None


def needs_test_bed(what: str) -> None:
    """A unit test that reaches for the bed fails at once, whether or not the bed is up."""
    if not _integration_test:
        pytest.fail(f"a unit test uses the test bed ({what}): mark it @pytest.mark.integration", pytrace=False)


def missing_test_bed(what: str) -> None:
    """Fail in CI, skip on a laptop without the bed (run `make testbed` to get it)."""
    needs_test_bed(what)
    message = f"test bed: {what} (run `make testbed`)"
    if REQUIRE_INTEGRATION:
        pytest.fail(message)
    pytest.skip(message)


def testbed_env() -> dict[str, str]:
    needs_test_bed(".testbed/env")
    path = ROOT / ".testbed" / "env"
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


testbed_env.__test__ = False  # a helper, not a test, wherever it is imported under its own name


@pytest.fixture(autouse=True)
def unit_tests_find_no_engine(request, monkeypatch):
    if request.node.get_closest_marker("integration") is None:
        for key, value in NO_ENGINE.items():
            monkeypatch.setenv(key, value)


@pytest.fixture
def gpu_run_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "gpu-run-home"
    monkeypatch.setenv("GPU_RUN_HOME", str(home))
    monkeypatch.delenv("GPU_RUN_CONFIG", raising=False)
    return home


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """2 classes, 40 train + 12 val each, 48 px: learnable in a couple of epochs at image size 32."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", classes=2, train_per_class=40,
                        val_per_class=12, size=48, seed=1)


@pytest.fixture(scope="session")
def big_dataset(tmp_path_factory) -> Path:
    """Enough bytes (about 1,000 files) that a sync takes long enough to be interrupted."""
    return make_dataset(tmp_path_factory.mktemp("data") / "big", classes=2, train_per_class=400,
                        val_per_class=100, size=256, seed=2)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    """The predicate's first truthy value. The one way a test waits: on timeout it raises
    AssertionError naming what it waited for, so no wait can fall through and let the test go on."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what} (last value: {value!r})")
        time.sleep(poll_s)


@pytest.fixture
def fault_row():
    """Records one row of the fault matrix when GPU_RUN_FAULT_TABLE names a file (make faults
    prints the table); each test asserts the same outcomes itself."""

    def record(fault: str, checkpoints_lost: int, machine_left_up: int, billed_idle_s: float | None,
               ledger_ok: bool) -> None:
        path = os.environ.get("GPU_RUN_FAULT_TABLE")
        if path:
            row = {"fault": fault, "checkpoints_lost": checkpoints_lost, "machine_left_up": machine_left_up,
                   "billed_idle_s": billed_idle_s, "ledger_ok": ledger_ok}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return record


@pytest.fixture
def docker_client():
    needs_test_bed("the Docker engine")
    from gpu_run.image import connect

    client = connect()
    if client is None:
        missing_test_bed("no Docker engine reachable")
    try:
        client.images.get("gpu-run-base:cpu")
    except Exception:
        missing_test_bed("image gpu-run-base:cpu is missing")
    return client


class CLI:
    """Runs `gpu-run` in a subprocess, in a working directory, as a user would."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env = cwd, env

    def __call__(self, *args: str, env: dict | None = None, timeout: float = 600, check: bool = False):
        proc = subprocess.run(
            [sys.executable, "-m", "gpu_run.cli", *args],
            cwd=self.cwd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"gpu-run {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str, **kwargs):
        proc = self(*args, "--json", check=True, **kwargs)
        return json.loads(proc.stdout)


@pytest.fixture
def cli(tmp_path, gpu_run_home) -> CLI:
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "GPU_RUN_HOME": str(gpu_run_home), "COLUMNS": "200"}
    return CLI(work, env)


def trainer(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpu_run.trainer.train", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def events(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


class HostPower:
    """The machine's power, in front of the test bed's sshd: a TCP forwarder on its own port that
    goes down the way a stopped machine does (no new logins, every open connection cut) once the
    stop command has written its marker file, and comes back when the marker is removed (the user
    starting the machine again). The containers and the watchdog behind it run on: only what the
    laptop can see of the machine is played."""

    def __init__(self, upstream_port: int, marker: Path):
        self.upstream_port, self.marker = upstream_port, marker
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listen()
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def up(self) -> bool:
        return self._listener is not None

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener

    def _power_off(self) -> None:
        listener, self._listener = self._listener, None
        listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _run(self) -> None:
        while not self._closed.is_set():
            if self._listener is not None and self.marker.exists():
                self._power_off()
            if self._listener is None:
                if not self.marker.exists():
                    self._listen()
                time.sleep(0.1)
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._power_off()


class SshHost:
    """The test bed's sshd as a rented host `t4-box`, seen from a laptop whose HOME is a temp folder.
    The laptop reaches it through HostPower, so that its stop command really takes it off the network."""

    def __init__(self, tmp_path: Path, gpu_run_home: Path, grace_s: int = 3):
        bed = testbed_env()
        if not bed:
            missing_test_bed("no .testbed/env (sshd not set up)")
        self.sshd_port = int(bed["GPU_RUN_TEST_SSH_PORT"])
        self.stop_marker = tmp_path / "host-stopped"
        self.power = HostPower(self.sshd_port, self.stop_marker)
        self.port = self.power.port
        self.key = bed["GPU_RUN_TEST_SSH_KEY"]
        self.host_key = Path(bed["GPU_RUN_TEST_SSH_HOST_KEY"]).read_text().split()[:2]
        self.home = tmp_path / "home"
        (self.home / ".ssh").mkdir(parents=True)
        self.known_hosts = self.home / ".ssh" / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(self.host_key)}\n")
        self.write_ssh_config(user=bed["GPU_RUN_TEST_SSH_USER"], key=self.key)
        self.workdir = tmp_path / "remote-workdir"
        self.work = tmp_path / "work"
        self.work.mkdir(exist_ok=True)
        self.write_config(grace_s=grace_s)
        env = {**os.environ, "GPU_RUN_HOME": str(gpu_run_home), "HOME": str(self.home), "COLUMNS": "200"}
        self.cli = CLI(self.work, env)
        import socket

        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex(("127.0.0.1", self.sshd_port)) != 0:
                missing_test_bed(f"no sshd on 127.0.0.1:{self.sshd_port}")

    def write_ssh_config(self, user: str, key: str, port: int | None = None) -> None:
        (self.home / ".ssh" / "config").write_text(
            f"Host t4-box\n  HostName 127.0.0.1\n  Port {port or self.port}\n  User {user}\n  IdentityFile {key}\n"
        )

    def write_config(self, grace_s: int = 3, extra: str = "") -> None:
        (self.work / "gpu-run.toml").write_text(
            "[hosts.t4-box]\n"
            'ssh = "t4-box"\n'
            "price_per_hour = 0.8\n"
            'currency = "CNY"\n'
            'billing = "per_second"\n'
            f'stop_command = "date +%s > {self.stop_marker}"\n'
            f'workdir = "{self.workdir}"\n'
            f"grace_s = {grace_s}\n" + extra
        )

    def start_machine(self) -> None:
        """The user starts the stopped machine again (the console's start button)."""
        self.stop_marker.unlink(missing_ok=True)
        wait_for(lambda: self.power.up, 10, "the test host to come back up", 0.05)

    def remote_run_dir(self, run_id: str) -> Path:
        return self.workdir / "runs" / run_id


def cut_ssh_connections() -> int:
    """Kill every per-connection sshd process of the test bed: all client connections drop at once."""
    pid = int((ROOT / ".testbed" / "ssh" / "sshd.pid").read_text())
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        subprocess.run(["kill", "-9", child])
    return len(children)


@pytest.fixture
def ssh_host(tmp_path, gpu_run_home, docker_client) -> SshHost:
    host = SshHost(tmp_path, gpu_run_home)
    yield host
    host.power.close()


# Leaks: nothing a test started may outlive it ------------------------------------------------------

LEAK_WAIT_S = 45  # a watchdog still in its grace period or its stop finishes within this


def _processes_naming(*texts: str) -> dict[int, str]:
    """Processes on this machine whose command line holds one of texts."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(text in cmdline for text in texts):
            found[int(entry.name)] = cmdline
    return found


def _leftover_processes() -> dict[int, str]:
    """Watchdogs and trainers running on this machine (the test host's and the laptop's alike)."""
    return _processes_naming("watchdog.sh", "trainer.train")


def _leftover_containers() -> set[str] | None:
    """gpu-run containers on the engine, or None when the engine does not answer."""
    try:
        out = subprocess.run(["docker", "ps", "-a", "--filter", "name=^gpu-run-", "--format", "{{.Names}}"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


class Cleanup:
    """What a test starts and must end itself (a container instance, a container left on a machine
    that was "stopped" through a cloud API, a watchdog retrying a stop forever): ended in teardown
    whether the test passed or failed. That teardown runs before the leak check, so register only
    what the test owns, never what the product should have cleaned up: that is a leak."""

    def __init__(self):
        self._containers: list = []
        self._process_texts: list[str] = []

    def container(self, names) -> None:
        """A container name, or a function that lists names when the test ends."""
        self._containers.append(names)

    def processes_naming(self, text: str) -> None:
        """Every process whose command line holds text (a run's folder on the host)."""
        self._process_texts.append(text)

    def run(self) -> None:
        if self._process_texts:
            _kill(_processes_naming(*self._process_texts))
        names = []
        for entry in self._containers:
            names += [entry] if isinstance(entry, str) else list(entry())
        if names:
            subprocess.run(["docker", "rm", "-f", *names], capture_output=True, timeout=120)


@pytest.fixture
def cleanup():
    done = Cleanup()
    yield done
    done.run()


@pytest.fixture(autouse=True)
def nothing_outlives_the_test(request):
    """A watchdog, trainer or gpu-run container left behind by a test is a leak, and a leak is a
    symptom (a machine that would go on billing): the test fails, and the leftovers are removed so
    that the next test starts clean. Containers are checked for integration tests on an engine that
    answers (a unit test finds no engine)."""
    before_procs = set(_leftover_processes())
    before_containers = _leftover_containers() if request.node.get_closest_marker("integration") else None
    yield

    def leftovers() -> tuple[dict[int, str], set[str]]:
        procs = {p: c for p, c in _leftover_processes().items() if p not in before_procs}
        if before_containers is None:
            return procs, set()
        now = _leftover_containers()
        return procs, ({"(the Docker engine does not answer)"} if now is None else now - before_containers)

    try:
        wait_for(lambda: not any(leftovers()), LEAK_WAIT_S, "the test's processes and containers to end", 0.5)
    except AssertionError:
        procs, containers = leftovers()
        _kill(procs)
        if containers:
            subprocess.run(["docker", "rm", "-f", *containers], capture_output=True, timeout=60)
        shown = "; ".join([*procs.values(), *sorted(containers)])
        pytest.fail(f"left running after the test: {shown}")
