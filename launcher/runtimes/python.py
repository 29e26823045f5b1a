"""Runtime: the trainer as a process group in the host's own Python, for container instances
(AutoDL, vast.ai, RunPod...) where Docker cannot run.

The platform's image brings Python, torch and CUDA; the laptop brings the trainer's code, shipped
content-addressed (an unchanged trainer is not sent again). What the platform's environment lacks
(boto3 for the S3 path) goes into a venv layered on its site-packages, never into the platform's
own environment. The trainer runs detached in its own session: `job.pgid` names the wrapper that
leads its process group, `job.pid` the trainer itself, `exit_code` appears when it ends, and
`train.log` holds its output; the watchdog watches those files as it would a container.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from gpu_run.backends.base import Job, Prepared, RunHandle, command_argv, job_env, launcher_argv, trainer_argv
from gpu_run.config import Host
from gpu_run.errors import BackendError
from gpu_run.packages import INSTALL
from gpu_run.platforms import PYTHON_CANDIDATES
from gpu_run.remote import Remote, quote
from gpu_run.runtimes.base import PYTHON_TAGS, Runtime, env_file_text
from gpu_run.shipped import trainer_files
from gpu_run.ui import UI

# Run by each candidate interpreter: it must import torch and torchvision to be the one.
_PROBE = (
    "import json, sys, torch, torchvision; print(json.dumps({'python': sys.executable, "
    "'python_version': sys.version.split()[0], 'torch': torch.__version__, 'torchvision': torchvision.__version__, "
    "'cuda': torch.cuda.is_available(), 'cuda_version': torch.version.cuda, 'gpus': torch.cuda.device_count()}))"
)


def files_hash(files: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, content in files:
        h.update(f"{name}\n{len(content)}\n".encode())
        h.update(content)
    return h.hexdigest()[:12]


def find_python(remote: Remote, configured: str | None) -> dict | None:
    """The first interpreter on the host that imports torch and torchvision, with what it found.
    A non-interactive SSH login does not initialise conda, so the usual places are probed too."""
    candidates = [configured] if configured else list(PYTHON_CANDIDATES)
    script = (
        "for p in " + quote(candidates) + "; do "
        'command -v "$p" >/dev/null 2>&1 || continue; '
        f'"$p" -c {quote([_PROBE])} 2>/dev/null && exit 0; '
        "done; exit 3"
    )
    r = remote.run(["sh", "-c", script], check=False, timeout_s=180)
    if r.code != 0 or not r.stdout.strip():
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


class PythonRuntime(Runtime):
    name = "python"

    def __init__(self, host: Host, remote: Remote, workdir: str, found: dict, why: str):
        super().__init__(host, remote, workdir)
        self.found = found
        self.python = found["python"]
        self.why = why  # why this runtime: said by the run and by doctor
        self.code_dir = ""

    def env_file_bytes(self, env: dict[str, str]) -> bytes:
        env_file_text(env)  # the same refusals
        return "".join(f"{key}={quote([value])}\n" for key, value in env.items()).encode()  # sourced by sh

    def describe(self) -> str:
        cuda = (
            f"CUDA {self.found['cuda_version']}, {self.found['gpus']} GPU(s)" if self.found["cuda"] else "no CUDA GPU"
        )
        return f"its own Python {self.python} (torch {self.found['torch']}, {cuda}; {self.why})"

    def versions(self) -> dict:
        return {
            k: self.found[k]
            for k in ("python", "python_version", "torch", "torchvision", "cuda", "cuda_version", "gpus")
        }

    # The code and the environment ------------------------------------------------------------------

    def _ship_code(self, ui: UI) -> bool:
        files = trainer_files()
        self.code_dir = f"{self.workdir}/trainer-code/{files_hash(files)}"
        if self.remote.run(["test", "-f", f"{self.code_dir}/.complete"], check=False).code == 0:
            ui.info(f"trainer code is up to date on {self.host.name} (nothing sent)")
            return False
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, content in files:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
        tmp = f"{self.code_dir}.tmp"
        # Unpacked beside and renamed into place: a cut upload never leaves a half trainer there.
        self.remote.run(
            f"rm -rf {quote([tmp])} && mkdir -p {quote([tmp])} && tar -C {quote([tmp])} -xf - && "
            f"touch {quote([tmp + '/.complete'])} && rm -rf {quote([self.code_dir])} && "
            f"mv {quote([tmp])} {quote([self.code_dir])}",
            input=buf.getvalue(),
        )
        ui.info(f"trainer code sent to {self.host.name} ({len(files)} files)")
        return True

    def ensure_module(self, module: str, package: str, ui: UI) -> None:
        """Make `module` importable for the trainer: from the platform's Python if it has it, else
        from a venv layered on its site-packages (the platform's environment stays untouched)."""
        if self.remote.run([self.python, "-c", f"import {module}"], check=False).code == 0:
            return
        venv = f"{self.workdir}/venv"
        prelude = f"{self.host.setup_command} >/dev/null 2>&1; " if self.host.setup_command else ""
        with ui.spinner(f"installing {package} into {venv} on {self.host.name}"):
            r = self.remote.run(
                f"{prelude}[ -x {quote([venv + '/bin/python'])} ] || {quote([self.python, '-m', 'venv', '--system-site-packages', venv])} && "
                f"{quote([venv + '/bin/python', '-m', 'pip', 'install', '-q', package])}",
                check=False,
                timeout_s=1800,
            )
        if r.code != 0:
            last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [f"exit code {r.code}"]
            raise BackendError(
                f"could not install {package} on {self.host.name} for the trainer: {last[0]}; "
                f"set setup_command to reach a package mirror, or install it there"
            )
        self.python = f"{venv}/bin/python"

    def prepare(self, ui: UI) -> Prepared:
        shipped = self._ship_code(ui)
        if self.host.sync == "s3":
            self.ensure_module("boto3", "boto3", ui)  # trainer/s3sync.py fetches and uploads with it
        return Prepared(image_tag=None, image_built=shipped, device="gpu" if self.found["cuda"] else "cpu")

    # The run ------------------------------------------------------------------------------------------

    def start(self, job: Job, run_dir: str, prepared: Prepared, env_file: str | None, ui: UI) -> dict:
        self.remote.run(self.start_command(job, run_dir, prepared, env_file))
        return {}

    def start_command(self, job: Job, run_dir: str, prepared: Prepared, env_file: str | None) -> str:
        env = {"TORCH_HOME": f"{self.workdir}/cache/torch", "PYTHONUNBUFFERED": "1", "GPU_RUN_JOB_DIR": run_dir}
        if job.command is None:
            nproc = max(1, job.gpus)  # --gpus is the number of trainer processes (gloo on a CPU)
            argv = launcher_argv(self.python, nproc, job) + trainer_argv(job, job.data_dir, job.out_dir, job.weights)
            cwd = self.code_dir
            env["PYTHONPATH"] = self.code_dir
            env.update(job_env(job, job.data_dir, job.out_dir))
        else:
            argv = command_argv(self.python, job)
            cwd = job.work_dir
            data_seen = f"{job.work_dir}/{job.data_rel}" if job.data_rel else job.data_dir
            env.update(job_env(job, data_seen, job.out_dir))
            if job.packages_dir:  # requirements.txt's packages, first on the path
                env["PYTHONPATH"] = job.packages_dir
            # `python`, `python3` and `pip` inside the command's own scripts mean this interpreter too.
            env["PATH"] = f"{run_dir}/bin:$PATH"
        if job.gpus == 0 or prepared.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif job.devices:  # a sweep's point running beside others: its own GPUs
            env["CUDA_VISIBLE_DEVICES"] = job.devices
        exports = " ".join(
            f"{k}={quote([v])}" if k != "PATH" else f'PATH={quote([run_dir + "/bin"])}:"$PATH"' for k, v in env.items()
        )
        # The --env values come from a file only the run's user can read, removed once read.
        load_env = f"set -a; . {quote([env_file])}; set +a; rm -f {quote([env_file])}; " if env_file else ""
        wrapper = (
            f"cd {quote([cwd])} && export {exports}; {load_env}"
            f"{quote(argv)} & echo $! > {quote([run_dir + '/job.pid'])}; wait $!; "
            f"echo $? > {quote([run_dir + '/.exit_code'])} && mv {quote([run_dir + '/.exit_code'])} {quote([run_dir + '/exit_code'])}"
        )
        # Its own session and process group (job.pgid), so that the whole group can be killed after
        # the grace and it outlives this SSH session; os.setsid from Python because not every
        # system has a setsid command (macOS has none).
        detach = [self.python, "-c", "import os, sys; os.setsid(); os.execvp('sh', ['sh', '-c', sys.argv[1]])", wrapper]
        # The log exists before this returns: whoever follows it next must find it.
        return (
            f"rm -f {quote([run_dir + '/exit_code'])}; : > {quote([run_dir + '/train.log'])}; "
            f"nohup {quote(detach)} >> {quote([run_dir + '/train.log'])} 2>&1 < /dev/null & "
            f"echo $! > {quote([run_dir + '/job.pgid'])}"
        )

    def watch_settings(self, job: Job) -> dict[str, str]:
        return {"WATCH": "process"}

    def python_tags(self) -> tuple[str, str]:
        version, platform = self.remote.run([self.python, "-c", PYTHON_TAGS]).stdout.split()[-2:]
        return version, platform

    def install_packages_command(self, wheels_dir: str, site_dir: str) -> str:
        return quote([self.python, "-c", INSTALL, wheels_dir, site_dir])

    @staticmethod
    def _alive(pid_file: str, run_dir: str) -> str:
        """Shell test: the process in pid_file lives and is this run's (a PID may have been reused
        by another process since: our trainer names the run on its command line, and every job
        has GPU_RUN_JOB_DIR=<run_dir> in its environment, which a user's `python train.py` keeps)."""
        run_id = run_dir.rstrip("/").rsplit("/", 1)[-1]
        return (
            f'{{ p=$(cat {quote([pid_file])} 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null && '
            f"{{ [ ! -r /proc/$p/cmdline ] || tr '\\0' ' ' < /proc/$p/cmdline | grep -qF -- {quote([run_id])} || "
            f"tr '\\0' '\\n' < /proc/$p/environ 2>/dev/null | grep -qxF -- {quote(['GPU_RUN_JOB_DIR=' + run_dir])}; }}; }}"
        )

    def log_command(self, handle: RunHandle, follow: bool) -> str:
        d = handle.run_dir
        log = quote([d + "/train.log"])
        if not follow:
            return f"cat {log} 2>/dev/null"
        # Ends once the trainer's group leader has gone, as `docker logs -f` does (and a moment
        # later, so that tail has printed the last lines).
        return (
            f"tail -n +1 -f {log} & t=$!; while {self._alive(d + '/job.pgid', d)}; do sleep 1; done; "
            "sleep 2; kill $t 2>/dev/null; wait $t 2>/dev/null; true"
        )

    def state_command(self, handle: RunHandle) -> str:
        d = handle.run_dir
        code_file = quote([d + "/exit_code"])
        # The code file is read again after the liveness test: the trainer may end in between.
        return (
            f"if [ -f {code_file} ]; then cat {code_file}; "
            f"elif {self._alive(d + '/job.pgid', d)}; then echo running; "
            f"elif [ -f {code_file} ]; then cat {code_file}; else echo gone; fi"
        )

    def exit_code(self, handle: RunHandle) -> int | None:
        out = self.remote.run(["sh", "-c", self.state_command(handle)], check=False).stdout.strip()
        if out == "running":
            return None
        return int(out) if out.lstrip("-").isdigit() else -1

    def stop_command(self, handle: RunHandle, timeout_s: int) -> str:
        d = handle.run_dir
        return (
            f'{self._alive(d + "/job.pid", d)} && kill -TERM "$p"; '
            f"i=0; while [ $i -lt {int(timeout_s)} ] && {self._alive(d + '/job.pgid', d)}; "
            "do sleep 1; i=$((i+1)); done; "
            f'{self._alive(d + "/job.pgid", d)} && kill -KILL -- "-$p"; true'
        )

    def stop(self, handle: RunHandle, timeout_s: int) -> None:
        self.remote.run(["sh", "-c", self.stop_command(handle, timeout_s)], check=False, timeout_s=timeout_s + 60)

    def s3sync_command(
        self, action: str, uri: str, host_dir: str, endpoint_url: str | None, credential_names: list[str]
    ) -> str:
        paths = [uri, host_dir] if action == "download" else [host_dir, uri]
        endpoint = ["--endpoint-url", endpoint_url] if endpoint_url else []
        return f"PYTHONPATH={quote([self.code_dir])} " + quote(
            [self.python, "-m", "trainer.s3sync", action, *paths, *endpoint]
        )
