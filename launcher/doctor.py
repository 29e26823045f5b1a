"""`gpu-run doctor HOST`: what the host offers and what is missing, in one table. For a group of
hosts (a comma list or [groups.NAME]): each host's checks, then what breaks multi-node training in
practice: the rendezvous port on the first node unreachable from the others, different torch/CUDA
versions, and NCCL choosing a network interface that does not reach the other nodes."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from gpu_run import host_facts
from gpu_run.backends import remote_for_host
from gpu_run.config import Config, Group, Host
from gpu_run.errors import GpuRunError
from gpu_run.multinode.network import check_port, choose_ifname, find_route, is_loopback
from gpu_run.multinode.nodes import in_parallel
from gpu_run.remote import Remote, quote
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
        return _row(
            "stop command",
            'not set: nothing would stop this host. Set stop_command = "sudo shutdown -h now" '
            '(or what stops it), or stop_command = "none" if it is yours and never stops',
            False,
        )
    if command == "none":
        return _row("stop command", "none: this host is never stopped (it is yours)", True, required=False)
    problem = stop_command_problem(remote, command)
    if problem:
        return _row("stop command", f"{command}: {problem}", False, required=host.kind != "aws")
    return _row(
        "stop command",
        f"{command} (the program is there" + (", sudo needs no password)" if command.startswith("sudo") else ")"),
        True,
    )


_FACTS_LOCK = threading.Lock()  # the hosts of a group are checked at once; their facts share one file


@dataclass
class Probed:
    """What a host's checks found that the group's checks compare: how the trainer would run there."""

    remote: Remote
    runtime: str | None  # docker | python | None (neither works)
    found: dict | None  # the python runtime's interpreter and its torch, torchvision and CUDA


def check_target(config: Config, name: str, accept_new_host_key: bool = False) -> list[dict]:
    """`doctor NAME`: a host's checks, or a group's (a comma list of hosts, or [groups.NAME])."""
    group = config.group(name)
    if group is None:
        return check_host(config.host(name), accept_new_host_key)
    return check_group(group, config, accept_new_host_key)


def check_host(host: Host, accept_new_host_key: bool = False) -> list[dict]:
    rows, probed = host_rows(host, accept_new_host_key)
    if probed is not None:
        probed.remote.close()
    return rows


def host_rows(host: Host, accept_new_host_key: bool = False) -> tuple[list[dict], Probed | None]:
    """A host's rows, and (for an SSH host that answered) its connection and runtime, still open."""
    if host.is_local:
        from gpu_run.image import connect

        client = connect()
        if client is None:
            return [_row("docker engine", "not reachable (the trainer runs as a local process)", True, False)], None
        return [_row("docker engine", client.version().get("Version", "?"), True)], None
    remote = remote_for_host(host, accept_new_host_key)
    try:
        remote.connect()
    except GpuRunError as e:
        return [_row("ssh login", str(e), False)], None
    probed = Probed(remote, None, None)
    rows = [_row("ssh login", f"{remote.target.display} as {remote.target.user}", True)]
    home = remote.home()
    workdir = remote.expand(host.workdir, home)

    version, why_not = (None, "runtime = python") if host.runtime == "python" else docker_version(remote)
    if version is not None:
        probed.runtime = "docker"
        rows.append(_row("runtime", f"docker: engine {version}", True))
        runtimes = remote.run(["docker", "info", "--format", "{{json .Runtimes}}"], check=False).stdout
        rows.append(
            _row(
                "nvidia runtime",
                "yes" if "nvidia" in runtimes else "no (training would run on the CPU)",
                "nvidia" in runtimes,
                required=False,
            )
        )
    elif host.runtime == "docker":
        rows.append(_row("runtime", f"docker: no working engine ({why_not})", False))
    else:
        found = find_python(remote, host.python)
        if found is None:
            rows.append(
                _row(
                    "runtime",
                    f"no Docker ({why_not}) and no Python there imports torch and torchvision; "
                    f'set python = "/path/to/python"',
                    False,
                )
            )
        else:
            probed.runtime, probed.found = "python", found
            cuda = (
                f"CUDA {found['cuda_version']}, {found['gpus']} GPU(s)" if found["cuda"] else "no CUDA GPU (CPU only)"
            )
            rows.append(
                _row(
                    "runtime",
                    f"python {found['python']} (torch {found['torch']}, torchvision "
                    f"{found['torchvision']}, {cuda}); no Docker here: {why_not}",
                    True,
                )
            )
    gpus = remote.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], check=False)
    rows.append(
        _row(
            "gpus",
            "; ".join(gpus.stdout.strip().splitlines()) if gpus.code == 0 else "none found",
            gpus.code == 0,
            required=False,
        )
    )
    nproc = remote.run(["nproc"], check=False).stdout.strip()
    vcpus = int(nproc) if nproc.isascii() and nproc.isdigit() else None  # "²" is a digit int() refuses
    rows.append(
        _row(
            "cpus",
            f"{vcpus} (the data loader's workers decode images on these)" if vcpus else "unknown",
            vcpus is not None,
            required=False,
        )
    )
    # `gpu-run plan` estimates this host from what was found here.
    gpu_names = [line.split(",")[0].strip() for line in gpus.stdout.strip().splitlines()] if gpus.code == 0 else []
    with _FACTS_LOCK:
        host_facts.record(host.name, gpu_names, vcpus)
    df = remote.run(f"mkdir -p {quote([workdir])} 2>/dev/null; df -Pk {quote([workdir])} | tail -1", check=False)
    try:
        free_gb = int(df.stdout.split()[3]) / 2**20
        rows.append(_row("free disk", f"{free_gb:.1f} GiB in {workdir}", free_gb > 5))
    except (IndexError, ValueError):
        rows.append(_row("free disk", f"unknown ({df.stderr.strip()})", False))
    rsync = remote.run(["sh", "-c", "command -v rsync"], check=False)
    rows.append(
        _row(
            "rsync", rsync.stdout.strip() or "not installed (not needed: gpu-run syncs with tar)", True, required=False
        )
    )
    rows.append(stop_command_row(host, remote))
    rearm = reboot_rearm(remote)
    rows.append(
        _row(
            "reboot re-arm",
            rearm
            or "none (no crontab on the host): a reboot mid-run ends the job, and "
            "the run's watchdog is gone with it; `gpu-run attach` starts it again",
            bool(rearm),
            required=False,
        )
    )
    rows.append(clock_row(remote))
    return rows, probed


def clock_row(remote: Remote) -> dict:
    """How far the host's clock is from the laptop's (billing and the watchdog's times use it)."""
    before = time.time()
    r = remote.run(["date", "+%s.%N"], check=False)
    after = time.time()
    # BusyBox date prints %N as "N"; then the seconds alone are what there is.
    answer = r.stdout.strip().replace("N", "0")
    try:
        remote_now = float(answer) if r.code == 0 else math.nan
    except ValueError:  # the host's answer is no number
        remote_now = math.nan
    if not math.isfinite(remote_now):
        return _row(
            "clock offset",
            "the host's clock could not be read (`date +%s.%N` gave no number of seconds)",
            False,
            required=False,
        )
    offset = remote_now - (before + after) / 2
    return _row("clock offset", f"{offset:+.2f} s", abs(offset) < 30, required=False)


# A group of hosts ----------------------------------------------------------------------------------


def check_group(group: Group, config: Config, accept_new_host_key: bool = False) -> list[dict]:
    """Every host's checks (at once), each row named by its host, then the group's own."""
    hosts = [config.host(name) for name in group.hosts]
    results = in_parallel(lambda host: host_rows(host, accept_new_host_key), hosts)
    rows: list[dict] = []
    probes: dict[str, Probed] = {}
    for host, result in zip(hosts, results):
        if isinstance(result, BaseException):
            if not isinstance(result, GpuRunError):
                raise result
            rows.append(_row(f"{host.name}: ssh login", str(result), False))
            continue
        host_checks, probed = result
        rows += [{**r, "check": f"{host.name}: {r['check']}"} for r in host_checks]
        if probed is not None:
            probes[host.name] = probed
    try:
        rows += group_rows(group, hosts, probes)
    finally:
        for probed in probes.values():
            probed.remote.close()
    return rows


def group_rows(group: Group, hosts: list[Host], probes: dict[str, Probed]) -> list[dict]:
    first = hosts[0].name
    rows = [
        _row(
            "nodes",
            f"{len(hosts)}: {', '.join(group.hosts)}; {first} hosts the rendezvous (torchrun's c10d "
            f"store) on port {group.rendezvous_port}",
            True,
            required=False,
        )
    ]
    rows.append(versions_row(hosts, probes))
    missing = [h.name for h in hosts if h.name not in probes]
    if first not in probes:
        rows.append(_row("rendezvous port", f"not checked: {first} cannot be reached", False))
        return rows
    address = group.rendezvous_host or probes[first].remote.target.hostname
    if is_loopback(address):
        rows.append(
            _row(
                "rendezvous address",
                f"{address} is loopback: only nodes on the same machine as {first} can "
                f"reach it; set rendezvous_host in [groups.{group.name}] to the address the others reach "
                f"{first} on",
                True,
                required=False,
            )
        )
    pythons = {name: (p.found or {}).get("python") for name, p in probes.items()}
    others = {h.name: probes[h.name].remote for h in hosts[1:] if h.name in probes}
    reached = check_port(first, probes[first].remote, others, address, group.rendezvous_port, pythons)
    port = f"{address}:{group.rendezvous_port}"
    if "" in reached:  # the first node could not listen: the port is taken, or there is nothing to listen with
        rows.append(_row("rendezvous port", reached[""], False, required="not checked" not in reached[""]))
    elif any(why != "ok" for why in reached.values()):
        bad = "; ".join(f"{name}: {why}" for name, why in reached.items() if why != "ok")
        rows.append(
            _row(
                "rendezvous port",
                f"{bad}; open port {group.rendezvous_port} on {first} to the other "
                f"nodes (or set rendezvous_host to an address they reach)",
                False,
            )
        )
    elif reached:
        rows.append(
            _row(
                "rendezvous port",
                f"{', '.join(reached)} reach{'es' if len(reached) == 1 else ''} {port} on {first}",
                True,
            )
        )
    if missing:
        rows.append(_row("rendezvous port", f"not checked from {', '.join(missing)}: cannot be reached", False))
    routes = {}
    for name, probed in probes.items():
        routes[name] = find_route(probed.remote, address, pythons.get(name))
    choice = choose_ifname(address, routes, group.nccl_socket_ifname, group.name)
    rows.append(_row("network interface", choice.message, choice.ok))
    return rows


def _found(probed: Probed) -> dict:
    """What find_python found on a node whose runtime is python."""
    assert probed.found is not None  # set with runtime "python"
    return probed.found


def versions_row(hosts: list[Host], probes: dict[str, Probed]) -> dict:
    """The same torch and CUDA everywhere: ranks built differently disagree on what they exchange."""
    runtimes = {name: p.runtime for name, p in probes.items()}
    if any(r is None for r in runtimes.values()) or len(runtimes) < len(hosts):
        return _row("torch versions", "not compared: a node has no working runtime or cannot be reached", False)
    if set(runtimes.values()) == {"docker"}:
        bases = {h.base_image for h in hosts}
        if len(bases) > 1:
            return _row(
                "torch versions",
                f"the hosts set different base_image ({', '.join(str(b) for b in bases)}): "
                f"their images' torch and CUDA may differ; give them one base_image",
                False,
            )
        return _row(
            "torch versions",
            "docker on every node: one image from the same recipe and base, so the same torch and CUDA by construction",
            True,
        )
    if set(runtimes.values()) == {"python"}:
        seen = {name: (_found(p)["torch"], _found(p).get("cuda_version")) for name, p in probes.items()}
        shown = ", ".join(f"{name} torch {t} / CUDA {c or 'none'}" for name, (t, c) in seen.items())
        if len(set(seen.values())) > 1:
            return _row(
                "torch versions",
                f"{shown}: the nodes must run the same torch and CUDA; choose the same "
                f"image on every rented machine (or set python = to one that matches)",
                False,
            )
        torch_v, cuda_v = next(iter(seen.values()))
        return _row("torch versions", f"torch {torch_v}, CUDA {cuda_v or 'none'} on every node", True)
    shown = ", ".join(
        f"{n} {'our image' if r == 'docker' else 'its own Python, torch ' + _found(probes[n])['torch']}"
        for n, r in runtimes.items()
    )
    return _row(
        "torch versions",
        f"mixed runtimes ({shown}): cannot compare; make sure the image's torch and CUDA match the others'",
        False,
        required=False,
    )
