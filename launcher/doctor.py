"""`gpu-run doctor HOST`: what the host offers and what is missing, in one table."""

from __future__ import annotations

import time

from gpu_run import host_facts
from gpu_run.backends import remote_for_host
from gpu_run.config import Host
from gpu_run.errors import GpuRunError
from gpu_run.remote import quote
from gpu_run.runtimes.docker import docker_version
from gpu_run.runtimes.python import find_python
from gpu_run.watchdog.host import reboot_rearm, stop_command_problem


def _row(check: str, result: str, ok: bool, required: bool = True) -> dict:
    return {"check": check, "result": result, "ok": ok, "required": required}


def stop_command_row(host: Host, remote) -> dict:
    """Whether the watchdog's stop can work there, found out before any money is spent."""
    command = host.stop_command
    if not command:
        if host.kind == "aws":
            return _row("stop command", "none: the instance is stopped through the EC2 API", True, required=False)
        return _row("stop command", 'not set: nothing would stop this host. Set stop_command = "sudo shutdown -h now" '
                    '(or what stops it), or stop_command = "none" if it is yours and never stops', False)
    if command == "none":
        return _row("stop command", "none: this host is never stopped (it is yours)", True, required=False)
    problem = stop_command_problem(remote, command)
    if problem:
        return _row("stop command", f"{command}: {problem}", False, required=host.kind != "aws")
    return _row("stop command", f"{command} (the program is there" + (", sudo needs no password)" if command.startswith("sudo") else ")"), True)


def check_host(host: Host, accept_new_host_key: bool = False) -> list[dict]:
    if host.is_local:
        from gpu_run.image import connect

        client = connect()
        if client is None:
            return [_row("docker engine", "not reachable (the trainer runs as a local process)", True, False)]
        return [_row("docker engine", client.version().get("Version", "?"), True)]
    remote = remote_for_host(host, accept_new_host_key)
    try:
        remote.connect()
    except GpuRunError as e:
        return [_row("ssh login", str(e), False)]
    rows = [_row("ssh login", f"{remote.target.display} as {remote.target.user}", True)]
    home = remote.home()
    workdir = remote.expand(host.workdir, home)

    version, why_not = (None, "runtime = python") if host.runtime == "python" else docker_version(remote)
    if version is not None:
        rows.append(_row("runtime", f"docker: engine {version}", True))
        runtimes = remote.run(["docker", "info", "--format", "{{json .Runtimes}}"], check=False).stdout
        rows.append(_row("nvidia runtime", "yes" if "nvidia" in runtimes else "no (training would run on the CPU)",
                         "nvidia" in runtimes, required=False))
    elif host.runtime == "docker":
        rows.append(_row("runtime", f"docker: no working engine ({why_not})", False))
    else:
        found = find_python(remote, host.python)
        if found is None:
            rows.append(_row("runtime", f"no Docker ({why_not}) and no Python there imports torch and torchvision; "
                             f"set python = \"/path/to/python\"", False))
        else:
            cuda = f"CUDA {found['cuda_version']}, {found['gpus']} GPU(s)" if found["cuda"] else "no CUDA GPU (CPU only)"
            rows.append(_row("runtime", f"python {found['python']} (torch {found['torch']}, torchvision "
                             f"{found['torchvision']}, {cuda}); no Docker here: {why_not}", True))
    gpus = remote.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], check=False)
    rows.append(_row("gpus", "; ".join(gpus.stdout.strip().splitlines()) if gpus.code == 0 else "none found",
                     gpus.code == 0, required=False))
    nproc = remote.run(["nproc"], check=False).stdout.strip()
    vcpus = int(nproc) if nproc.isdigit() else None
    rows.append(_row("cpus", f"{vcpus} (the data loader's workers decode images on these)" if vcpus else "unknown",
                     vcpus is not None, required=False))
    # `gpu-run plan` estimates this host from what was found here.
    gpu_names = [line.split(",")[0].strip() for line in gpus.stdout.strip().splitlines()] if gpus.code == 0 else []
    host_facts.record(host.name, gpu_names, vcpus)
    df = remote.run(f"mkdir -p {quote([workdir])} 2>/dev/null; df -Pk {quote([workdir])} | tail -1", check=False)
    try:
        free_gb = int(df.stdout.split()[3]) / 2**20
        rows.append(_row("free disk", f"{free_gb:.1f} GiB in {workdir}", free_gb > 5))
    except (IndexError, ValueError):
        rows.append(_row("free disk", f"unknown ({df.stderr.strip()})", False))
    rsync = remote.run(["sh", "-c", "command -v rsync"], check=False)
    rows.append(_row("rsync", rsync.stdout.strip() or "not installed (not needed: gpu-run syncs with tar)",
                     True, required=False))
    rows.append(stop_command_row(host, remote))
    rearm = reboot_rearm(remote)
    rows.append(_row("reboot re-arm", rearm or "none (no crontab on the host): a reboot mid-run ends the job, and "
                     "the run's watchdog is gone with it; `gpu-run attach` starts it again", bool(rearm), required=False))
    before = time.time()
    remote_now = float(remote.run(["date", "+%s.%N"]).stdout.strip().replace("N", "0") or 0)
    offset = remote_now - (before + time.time()) / 2
    rows.append(_row("clock offset", f"{offset:+.2f} s", abs(offset) < 30, required=False))
    remote.close()
    return rows
