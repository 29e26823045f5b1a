"""gpu-run.toml (or $GPU_RUN_CONFIG) and the environment -> typed, validated Host objects.

Parsing is pure: `parse_hosts` takes the decoded TOML and returns hosts or raises ConfigError, so
its tests need no files. `load_config` adds the file lookup and `.env`.
"""

from __future__ import annotations

import math
import os
import re
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Ubuntu 22.04's python3): the same parser, from PyPI
    import tomli as tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from dotenv import load_dotenv

from gpu_run.errors import ConfigError
from gpu_run.money.prices import hourly_price
from gpu_run.platforms import PRESETS

CONFIG_FILENAME = "gpu-run.toml"
BILLING_RULES = ("per_second", "per_minute", "per_hour")
LOCAL_HOST = "local"
RUNTIMES = ("auto", "docker", "python")
MAX_VCPUS = 4096
# Host names end up in tables (where rich reads `[...]` as markup), file names and the ledger.
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# user@host:port or host:port (an IPv6 host in brackets); an ssh_config alias has no port here.
_SSH_PORT = re.compile(r"^(?:[^@]+@)?(?:\[[^\]]+\]|[^:\[\]]+):(?P<port>\d+)$")


@dataclass(frozen=True)
class Host:
    """A place a training container runs: the local engine, an SSH box, or a cloud instance."""

    name: str
    kind: str = "local"  # local | ssh | aws
    # How to reach it.
    ssh: str | None = None  # ssh_config alias or user@host[:port]
    workdir: str = "~/gpu-run"
    base_image: str | None = None  # overrides the CUDA/CPU default
    # What it costs.
    price_per_hour: float = 0.0
    currency: str = "USD"
    billing: str = "per_second"
    min_billed_s: int = 0
    # How it stops.
    stop_command: str | None = None
    grace_s: int = 60
    # Cloud provider (kind == "aws").
    instance_id: str | None = None
    region: str | None = None
    instance_type: str | None = None
    ssh_user: str | None = None
    ssh_key: str | None = None
    endpoint_url: str | None = None
    # Data path.
    sync: str = "ssh"  # ssh | s3
    bucket: str | None = None
    prefix: str = "gpu-run"
    s3_endpoint_url: str | None = None
    # What the host gets to reach S3: short-lived keys scoped to bucket/prefix from STS (assuming
    # s3_role_arn when set), or "laptop": the laptop's own keys, for stores without STS.
    s3_host_credentials: str = "scoped"  # scoped | laptop
    s3_role_arn: str | None = None
    # How the trainer runs there: in our image on the host's Docker engine, or in the host's own
    # Python (container instances, where Docker cannot run); auto: Docker when it answers.
    runtime: str = "auto"  # auto | docker | python
    python: str | None = None  # the interpreter for runtime python (default: probed)
    setup_command: str | None = None  # shell prelude before pip on the host (a mirror, a proxy)
    preset: str | None = None  # a platform whose defaults fill this table (launcher/platforms.py)
    # What the machine has, for `gpu-run plan` (else what `gpu-run doctor` found, or past runs say).
    gpu: str | None = None  # "RTX 4090", "T4", "A100 80GB PCIe"...; "none" for a CPU-only host
    vcpus: int | None = None  # CPU cores the trainer's data loader can use

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def is_free(self) -> bool:
        return self.price_per_hour == 0


RENDEZVOUS_PORT = 29400  # torchrun's own default for the c10d rendezvous
_GROUP_KEYS = {"hosts", "rendezvous_host", "rendezvous_port", "nccl_socket_ifname"}
_IFNAME = re.compile(r"^\^?=?[A-Za-z0-9_.:@-]+(,[A-Za-z0-9_.:@-]+)*$")


@dataclass(frozen=True)
class Group:
    """Several hosts that train one job together (torchrun's c10d rendezvous on the first).

    The name is the [groups.NAME] table's, or the comma list as written on the command line."""

    name: str
    hosts: tuple[str, ...]
    # The address the other nodes reach the first one on; None: its SSH host name as the laptop knows it.
    rendezvous_host: str | None = None
    rendezvous_port: int = RENDEZVOUS_PORT
    # The network interface NCCL (and gloo) use on every node; None: the one that reaches the first node.
    nccl_socket_ifname: str | None = None


@dataclass(frozen=True)
class Config:
    hosts: dict[str, Host] = field(default_factory=dict)
    source: Path | None = None
    groups: dict[str, Group] = field(default_factory=dict)

    def group(self, target: str) -> Group | None:
        """The group `--host` names (a [groups.NAME] table, or a comma list of hosts), None for one host."""
        if target in self.groups:
            return self.groups[target]
        if "," not in target:
            return None
        names = tuple(n.strip() for n in target.split(","))
        group = Group(name=",".join(names), hosts=names)
        check_group(group, self.hosts, f"hosts {target}")
        return group

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts))
            where = f"in {self.source}" if self.source else f"(no {CONFIG_FILENAME} found)"
            raise ConfigError(f"unknown host {name!r}: known hosts are {known}; add [hosts.{name}] {where}") from None


def builtin_local_host() -> Host:
    return Host(name=LOCAL_HOST, kind="local", price_per_hour=0.0, currency="USD", grace_s=0)


_HOST_KEYS = {f.name for f in fields(Host)} - {"name", "kind"} | {"provider"}


def parse_host(name: str, table: dict) -> Host:
    """One [hosts.NAME] table -> Host; every mistake becomes one ConfigError line."""
    if not _HOST_NAME.match(name):
        raise ConfigError(f"host name {name!r} in {CONFIG_FILENAME}: use letters, digits, '-', '_' and '.' only")
    if not isinstance(table, dict):
        raise ConfigError(f"[hosts.{name}] must be a table of settings")
    unknown = sorted(set(table) - _HOST_KEYS)
    if unknown:
        raise ConfigError(
            f"[hosts.{name}]: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(_HOST_KEYS))}"
        )
    values = dict(table)
    preset = values.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"[hosts.{name}]: unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        values = {**PRESETS[preset], **values}  # the table's own settings win
    provider = values.pop("provider", None)
    if name == LOCAL_HOST:
        kind = "local"
    elif provider == "aws":
        kind = "aws"
    elif provider not in (None, "none"):
        raise ConfigError(f'[hosts.{name}]: provider {provider!r} is not supported; use "aws" or leave it out')
    elif "ssh" in values:
        kind = "ssh"
    else:
        raise ConfigError(f'[hosts.{name}]: say how to reach it: ssh = "alias" or provider = "aws"')

    # bool is an int in Python, and TOML allows nan and inf: both would pass a plain type check.
    for key in ("price_per_hour",):
        if key in values:
            value = values[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"[hosts.{name}]: {key} must be a number >= 0, got {value!r}")
            values[key] = float(value)
    for key in ("grace_s", "min_billed_s"):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 0):
            raise ConfigError(f"[hosts.{name}]: {key} must be a whole number of seconds >= 0, got {values[key]!r}")
    if "vcpus" in values and (
        not isinstance(values["vcpus"], int)
        or isinstance(values["vcpus"], bool)
        or not 1 <= values["vcpus"] <= MAX_VCPUS
    ):
        raise ConfigError(
            f"[hosts.{name}]: vcpus must be a whole number of CPU cores from 1 to {MAX_VCPUS}, got {values['vcpus']!r}"
        )
    if "gpu" in values and (not isinstance(values["gpu"], str) or not values["gpu"].strip()):
        raise ConfigError(
            f'[hosts.{name}]: gpu must name the GPU model (gpu = "RTX 4090"), or be "none" for '
            f"a host without one; got {values['gpu']!r}"
        )
    if values.get("billing", "per_second") not in BILLING_RULES:
        raise ConfigError(
            f"[hosts.{name}]: billing must be one of {', '.join(BILLING_RULES)}, got {values['billing']!r}"
        )
    if values.get("sync", "ssh") not in ("ssh", "s3"):
        raise ConfigError(f'[hosts.{name}]: sync must be "ssh" or "s3", got {values["sync"]!r}')
    if values.get("s3_host_credentials", "scoped") not in ("scoped", "laptop"):
        raise ConfigError(
            f'[hosts.{name}]: s3_host_credentials must be "scoped" or "laptop", got {values["s3_host_credentials"]!r}'
        )
    if values.get("runtime", "auto") not in RUNTIMES:
        raise ConfigError(f"[hosts.{name}]: runtime must be one of {', '.join(RUNTIMES)}, got {values['runtime']!r}")
    if values.get("sync") == "s3" and not values.get("bucket"):
        raise ConfigError(f'[hosts.{name}]: sync = "s3" needs bucket = "..."')
    if kind == "aws":
        for key in ("instance_id", "region"):
            if not values.get(key):
                raise ConfigError(f'[hosts.{name}]: provider = "aws" needs {key} = "..."')
        values.setdefault("min_billed_s", 60)  # EC2 Linux bills per second with a 60 s minimum
        if "price_per_hour" not in values:
            price = (
                hourly_price(values.get("instance_type", ""), values["region"]) if values.get("instance_type") else None
            )
            if price is None:
                raise ConfigError(
                    f"[hosts.{name}]: no shipped price for instance_type {values.get('instance_type')!r} in "
                    f"{values['region']}; set instance_type to a known one or price_per_hour = <USD per hour>"
                )
            values["price_per_hour"] = price
            values.setdefault("currency", "USD")
        values.setdefault("stop_command", "sudo shutdown -h now")
    for key, value in values.items():
        if key in ("price_per_hour", "grace_s", "min_billed_s", "vcpus"):
            continue
        if not isinstance(value, str):
            raise ConfigError(f"[hosts.{name}]: {key} must be a string, got {value!r}")
    check_ssh_port(name, values.get("ssh"))
    return Host(name=name, kind=kind, **values)


def check_ssh_port(name: str, ssh: str | None) -> None:
    """A port outside 1..65535 in `ssh = "user@host:PORT"` is refused here, not at connect time."""
    if ssh is not None and not ssh.strip():
        raise ConfigError(f"[hosts.{name}]: ssh is empty; write an ~/.ssh/config alias or user@host:port")
    m = _SSH_PORT.match(ssh or "")
    if m and not 1 <= int(m.group("port")) <= 65535:
        raise ConfigError(f"[hosts.{name}]: ssh = {ssh!r} has port {m.group('port')}; a port is 1 to 65535")


def parse_hosts(document: dict) -> dict[str, Host]:
    unknown = sorted(set(document) - {"hosts", "groups"})
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}] in {CONFIG_FILENAME}; only [hosts.NAME] and [groups.NAME] tables are read"
        )
    tables = document.get("hosts", {})
    if not isinstance(tables, dict):
        raise ConfigError(
            f"hosts in {CONFIG_FILENAME} must be tables: write [hosts.NAME] sections, not hosts = {tables!r}"
        )
    hosts = {LOCAL_HOST: builtin_local_host()}
    for name, table in tables.items():
        hosts[name] = parse_host(name, table)
    return hosts


def check_group(group: Group, hosts: dict[str, Host], where: str) -> None:
    """The hosts of one multi-node job: two or more, each once, each known and reached over SSH
    (the laptop's own engine cannot take part), all billing in one currency so the cost adds up."""
    if any(not name for name in group.hosts):
        raise ConfigError(f"{where}: an empty host name in the list; write host names separated by commas: box-a,box-b")
    if len(group.hosts) < 2:
        raise ConfigError(f"{where}: a group needs two hosts or more; for one host, give its name alone")
    repeated = sorted({n for n in group.hosts if group.hosts.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"{where}: host {repeated[0]} is listed twice; each host is one node (--gpus sets the processes on each)"
        )
    unknown = [n for n in group.hosts if n not in hosts]
    if unknown:
        known = ", ".join(sorted(h for h in hosts if h != LOCAL_HOST)) or "none"
        raise ConfigError(
            f"{where}: unknown host {unknown[0]!r} (known hosts: {known}); add [hosts.{unknown[0]}] "
            f"to {CONFIG_FILENAME}"
        )
    local = [n for n in group.hosts if hosts[n].is_local]
    if local:
        raise ConfigError(
            f"{where}: host {local[0]} is the local Docker engine; every node of a multi-node job is a "
            f"machine reached over SSH"
        )
    currencies = sorted({hosts[n].currency for n in group.hosts})
    if len(currencies) > 1:
        raise ConfigError(
            f"{where}: the hosts bill in {' and '.join(currencies)}; the nodes of one job must bill in "
            f"one currency, so that its cost adds up"
        )


def parse_group(name: str, table, hosts: dict[str, Host]) -> Group:
    """One [groups.NAME] table -> Group; every mistake becomes one ConfigError line."""
    where = f"[groups.{name}]"
    if not _HOST_NAME.match(name):
        raise ConfigError(f"group name {name!r} in {CONFIG_FILENAME}: use letters, digits, '-', '_' and '.' only")
    if name in hosts:
        raise ConfigError(f"{where}: {name} is also a host's name; give the group a name of its own")
    if not isinstance(table, dict):
        raise ConfigError(f'{where} must be a table of settings: hosts = ["box-a", "box-b"]')
    unknown = sorted(set(table) - _GROUP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(_GROUP_KEYS))}")
    names = table.get("hosts")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f'{where}: hosts must be a list of host names: hosts = ["box-a", "box-b"]')
    port = table.get("rendezvous_port", RENDEZVOUS_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: rendezvous_port must be a port number from 1 to 65535, got {port!r}")
    address = table.get("rendezvous_host")
    if address is not None and (
        not isinstance(address, str) or not address.strip() or any(c in address for c in " /:")
    ):
        raise ConfigError(
            f"{where}: rendezvous_host must be the first node's address as the others reach it "
            f"(a host name or IPv4 address, no port), got {address!r}"
        )
    ifname = table.get("nccl_socket_ifname")
    if ifname is not None and (not isinstance(ifname, str) or not _IFNAME.match(ifname)):
        raise ConfigError(
            f"{where}: nccl_socket_ifname must name network interfaces as NCCL_SOCKET_IFNAME does "
            f"(eth0, or ens,eth, or ^docker), got {ifname!r}"
        )
    group = Group(
        name=name, hosts=tuple(names), rendezvous_host=address, rendezvous_port=port, nccl_socket_ifname=ifname
    )
    check_group(group, hosts, where)
    return group


def parse_groups(document: dict, hosts: dict[str, Host]) -> dict[str, Group]:
    tables = document.get("groups", {})
    if not isinstance(tables, dict):
        raise ConfigError(
            f"groups in {CONFIG_FILENAME} must be tables: write [groups.NAME] sections with hosts = [...]"
        )
    return {name: parse_group(name, table, hosts) for name, table in tables.items()}


def find_config_file(cwd: Path | None = None) -> Path | None:
    env = os.environ.get("GPU_RUN_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"GPU_RUN_CONFIG points to {path}, which is not a file")
        return path
    path = (cwd or Path.cwd()) / CONFIG_FILENAME
    return path if path.is_file() else None


def load_config(cwd: Path | None = None) -> Config:
    """Read .env (without overriding the real environment), then gpu-run.toml if there is one."""
    load_dotenv((cwd or Path.cwd()) / ".env", override=False)
    path = find_config_file(cwd)
    if path is None:
        return Config(hosts={LOCAL_HOST: builtin_local_host()}, source=None)
    try:
        # TOML is UTF-8; "utf-8-sig" also takes the byte-order mark Windows editors add.
        document = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text (UTF-16?); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}; check that it is a file you can read") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    hosts = parse_hosts(document)
    return Config(hosts=hosts, source=path, groups=parse_groups(document, hosts))
