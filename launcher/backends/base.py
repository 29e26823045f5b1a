"""What every backend (a place a job runs: a container or a process) offers the driver."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_run.providers.base import StopResult
from gpu_run.ui import UI

if TYPE_CHECKING:
    from gpu_run.project import Project

# What the trainer gets, once asked to stop, to finish its step and write last.pth before it is
# killed: the default of `gpu-run train --stop-timeout`, and of every stop that has no run's own.
STOP_TIMEOUT_S = 120


@dataclass
class Job:
    """One trainer invocation; the backend maps the paths to wherever the trainer sees them."""

    run_id: str
    trainer_args: list[str]  # everything except --data/--out/--weights
    data_dir: str  # as the machine running the trainer sees it
    out_dir: str  # likewise; on the local host this is runs/<run-id>/ itself
    weights: str = "none"  # none | imagenet | a file path as that machine sees it
    gpus: int = 1  # trainer processes, one per GPU (N > 1 runs torchrun); 0 forces the CPU
    env: dict[str, str] = field(default_factory=dict)
    # Limits the host-side watchdog enforces (0: none), and what it does at the end.
    max_runtime_s: int = 0
    silence_s: int = 0
    stop_timeout_s: int = STOP_TIMEOUT_S
    keep_alive: bool = False
    terminate: bool = False  # cloud instances: terminate instead of stop at the end
    seed_dir: str | None = None  # a local folder (a resumed run's checkpoints) to put in out_dir first
    # Multi-node (one job over several machines): torchrun's c10d rendezvous on the first node.
    nnodes: int = 1
    node_rank: int = 0  # 0 hosts the rendezvous store (and writes the checkpoints)
    rdzv_endpoint: str = ""  # host:port every node reaches
    rdzv_id: str = ""  # the same on every node of one job (the run id)
    local_addr: str = ""  # torchrun's --local-addr: how the other nodes reach this one ("": its host name)
    # Sweeps: the GPUs this trainer may use on its host ("" = all), when points share a host.
    devices: str = ""
    # The user's own command instead of our trainer: its argv, run in work_dir (a copy of the
    # project's mirror code_dir), with the dataset also at data_rel inside it when --data lies in
    # the project; seed_work_dir is a local folder put into work_dir first (--resume).
    command: list[str] | None = None
    code_dir: str = ""
    work_dir: str = ""
    data_rel: str = ""
    seed_work_dir: str | None = None
    hub_weights: list[str] = field(default_factory=list)  # laptop files for TORCH_HOME/hub/checkpoints/
    packages_dir: str = ""  # requirements.txt's packages, unpacked there (on the job's PYTHONPATH)


def job_env(job: Job, data_dir: str, out_dir: str) -> dict[str, str]:
    """What every job finds in its environment, as its machine (or container) sees the paths.
    GPU_RUN_JOB_DIR names the run's folder so that the host-side checks recognise the job's
    processes even when their command line does not name the run (a user's `python train.py`)."""
    env = {"GPU_RUN_RUN_ID": job.run_id, "GPU_RUN_OUTPUT": out_dir}
    if job.command is not None:
        env["GPU_RUN_DATA"] = data_dir
    return env


NOTHING_BILLS = StopResult(True, "not_needed", None, "nothing bills on this host")


@dataclass
class RunHandle:
    """Where a started run is, saved in the ledger so that `attach`, `stop` and `status` find it
    again from another process. One record for every backend; what one does not use stays empty."""

    backend: str = ""  # ssh | docker | process
    runtime: str = ""  # docker | python: how the trainer runs there
    run_dir: str = ""  # the job's own files on its machine (pid, log, exit code, the watchdog's)
    out_dir: str = ""  # where the trainer writes, as its machine sees it
    container: str = ""  # the docker runtime's container
    keep_alive: bool = False
    terminate: bool = False
    device: str = ""  # gpu | cpu
    image_built: bool = False  # the image (or the trainer's code) was built or sent for this run
    versions: dict = field(default_factory=dict)  # python, torch, torchvision, CUDA as found there
    work_dir: str = ""  # a user's command: its working directory there (what it changed comes back)
    # A multi-node run: one record per node (its host, host-side run id, handle, billed span, stop);
    # the fields above are then the first node's (gpu_run.multinode.nodes.NodeRecord).
    nodes: list = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.run_dir.rstrip("/").rsplit("/", 1)[-1]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> RunHandle | None:
        """A handle from the ledger; keys of older releases that no field takes are dropped."""
        if not text:
            return None
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Prepared:
    """What prepare() found or made: the image (if any) and what the trainer will run on."""

    image_tag: str | None
    image_built: bool
    device: str  # "gpu" or "cpu"


class Backend(ABC):
    """Run the trainer somewhere: prepare, start detached, follow logs, wait, stop, clean up.

    start() returns a RunHandle; every later call gets it back (from the ledger, in another
    process too).
    """

    name: str

    @abstractmethod
    def describe(self) -> str:
        """One line: what this backend is, for the user."""

    def stage_data(self, local_root: Path, dataset_id: str, ui: UI) -> str:
        """Put the dataset where the trainer can read it; its path as the trainer's machine sees it."""
        return str(local_root)

    def out_dir_for(self, run_id: str, local_run_dir: Path) -> str:
        """Where the trainer writes outputs, as its machine sees it (locally: the run folder itself)."""
        return str(local_run_dir)

    def run_dir(self, run_id: str) -> str:
        """Where the job's own files (pid, log, exit code, the watchdog's) are on its machine."""
        return ""

    @abstractmethod
    def stage_code(self, project: Project, ui: UI) -> str:
        """A user's project folder onto the machine (its mirror there, incremental); its path."""

    @abstractmethod
    def stage_packages(self, project: Project, ui: UI) -> str:
        """The project's requirements.txt installed for the job there ("" when it has none); its folder."""

    @abstractmethod
    def work_dir_for(self, run_id: str) -> str:
        """Where a user's command runs: the run's own copy of the project, as its machine sees it."""

    @abstractmethod
    def prepare(self, ui: UI) -> Prepared:
        """Make sure the trainer can start (image built, device chosen)."""

    @abstractmethod
    def start(self, job: Job, prepared: Prepared, ui: UI) -> RunHandle:
        """Start the trainer detached; return its handle."""

    @abstractmethod
    def follow_logs(self, handle: RunHandle) -> Iterator[str]:
        """Every log line from the beginning, then new ones until the job ends."""

    @abstractmethod
    def read_logs(self, handle: RunHandle) -> list[str]:
        """The log lines so far, without waiting."""

    @abstractmethod
    def wait(self, handle: RunHandle) -> int:
        """Block until the job ends; its exit code."""

    @abstractmethod
    def is_running(self, handle: RunHandle) -> bool:
        """Whether the trainer is still running."""

    @abstractmethod
    def exit_code(self, handle: RunHandle) -> int | None:
        """The exit code once the job has ended, None while it runs or when it is unknown."""

    @abstractmethod
    def stop(self, handle: RunHandle, timeout_s: int = STOP_TIMEOUT_S) -> None:
        """SIGTERM (the trainer saves last.pth at the next step), then force after timeout_s."""

    def pull(self, handle: RunHandle, out_dir: Path, ui: UI) -> None:  # noqa: B027 (a hook that does nothing by default)
        """Bring the outputs that exist now into out_dir (nothing to do where they are written there)."""

    @abstractmethod
    def finish(self, handle: RunHandle, out_dir: Path, ui: UI) -> dict:
        """After the job ended: make sure all outputs are in out_dir and release what it held.
        Returns what the host recorded about the end (e.g. the watchdog's outcome), if anything."""

    def claim(self, run_id: str, keep_alive: bool) -> None:  # noqa: B027 (a hook that does nothing by default)
        """Hold the machine for this run from its first step, so no other run's end stops it."""

    def abort(self, ui: UI, keep_alive: bool = False) -> StopResult:
        """Setup failed before the trainer started: stop the machine rather than leave it billing
        (unless another run holds it)."""
        return NOTHING_BILLS

    def check_stop(self, keep_alive: bool, ui: UI) -> None:  # noqa: B027 (a hook that does nothing by default)
        """Refuse, before any money is spent, a machine whose stop cannot work (hosts that stop)."""

    def abandon(self, run_id: str, ui: UI) -> StopResult:
        """A run whose laptop died during setup: end what it left on the machine and release it."""
        return NOTHING_BILLS

    def ensure_watchdog(self, handle: RunHandle, ui: UI) -> None:  # noqa: B027 (a hook that does nothing by default)
        """Start the host's watchdog again if it was killed (hosts that have one)."""

    def release(self, handle: RunHandle, ui: UI) -> StopResult:
        """Let the machine stop after the run and confirm that it did."""
        return NOTHING_BILLS

    def retry_stop(self, handle: RunHandle, ui: UI) -> StopResult:
        """A stop that failed or was not confirmed: try again from the laptop and confirm."""
        return NOTHING_BILLS


def trainer_argv(job: Job, data_dir: str, out_dir: str, weights: str) -> list[str]:
    return ["--data", data_dir, "--out", out_dir, "--weights", weights, *job.trainer_args]


# torchrun, as `python -m torch.distributed.run` runs it, also on a torch built without libuv
# (Debian's and Ubuntu's python3-torch 2.6), whose TCPStore refuses the libuv it asks for by
# default: there the rendezvous store is made without it, and the trainers make their own store
# (not the agent's, which they would open asking for libuv again) with USE_LIBUV=0.
TORCHRUN = """\
import os, sys
import torch.distributed as dist
try:
    dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
except RuntimeError:
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as c10d

    class TCPStore(dist.TCPStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "use_libuv": False})

    os.environ.update(USE_LIBUV="0", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    dist.TCPStore = c10d.TCPStore = TCPStore
from torch.distributed.run import main
sys.argv[0] = "torchrun"
main()
"""


def is_python(program: str) -> bool:
    """`python`, `python3`, `python3.11`: the interpreter the runtime chose stands in for it."""
    return re.fullmatch(r"python[0-9.]*", program.rsplit("/", 1)[-1]) is not None


def command_argv(python: str, job: Job) -> list[str]:
    """A user's command as its runtime starts it: `python ...` on the interpreter the runtime
    found (a container instance's conda is not on a non-interactive login's PATH), and
    `python SCRIPT ...` under torchrun when it asks for several processes (a DDP script reads
    torchrun's environment as usual); anything else exactly as written."""
    command = list(job.command or [])
    if not command or not is_python(command[0]):
        return command
    nproc = max(1, job.gpus)
    if nproc > 1 or job.nnodes > 1:
        return launcher_argv(python, nproc, job, target=command[1:])
    return [python, *command[1:]]


def launcher_argv(python: str, nproc: int, job: Job | None = None, target: list[str] | None = None) -> list[str]:
    """How to start the trainer (or `target`, a script and its arguments): plainly, under torchrun
    for several GPUs (or CPU processes) on one machine, or under torchrun's c10d rendezvous for a
    job over several machines."""
    target = target if target is not None else ["-m", "trainer.train"]
    if job is not None and job.nnodes > 1:
        # The first node hosts the rendezvous store (is_host), so no node has to guess it from
        # host names; no restarts: a node that fails ends the job, and the watchdogs stop the machines.
        return [
            python,
            "-c",
            TORCHRUN,
            f"--nnodes={job.nnodes}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={job.rdzv_endpoint}",
            f"--rdzv-id={job.rdzv_id}",
            f"--rdzv-conf=is_host={1 if job.node_rank == 0 else 0}",
            "--max-restarts=0",
            *([f"--local-addr={job.local_addr}"] if job.local_addr else []),
            *target,
        ]
    if nproc > 1:
        return [python, "-c", TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *target]
    return [python, *target]
