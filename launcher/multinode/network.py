"""What multi-node training needs of the network, asked of the nodes themselves: which interface
reaches the first node (NCCL and gloo must use that one), and whether the rendezvous port on the
first node is reachable from the others. Used by `doctor` before a run and by `train` to set
NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME."""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass

from gpu_run.remote import Remote, quote

# Interfaces NCCL skips by default (loopback, Docker's bridges and their veth ends) or that never
# reach another machine (libvirt's bridge): a route through one of them is the wrong way out.
EXCLUDED_PREFIXES = ("lo", "docker", "br-", "veth", "virbr")
PROBE_TIMEOUT_S = 5  # a connect to the rendezvous port: a filtered port answers nothing at all

# Run by the node's Python (stdlib only): the source address the kernel picks for a packet to the
# first node is on the interface that reaches it; for the first node itself, the address is its own.
_ROUTE_PY = r"""
import fcntl, json, socket, struct, sys
target = sys.argv[1]
try:
    address = socket.gethostbyname(target)
except OSError as e:
    print(json.dumps({"error": "cannot resolve %s: %s" % (target, e)}))
    sys.exit(0)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
interfaces = []
for _, name in socket.if_nameindex():
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
    except OSError:
        continue
    interfaces.append([name, socket.inet_ntoa(packed[20:24])])
try:
    s.connect((address, 9))
    source = s.getsockname()[0]
except OSError:
    source = None
print(json.dumps({"address": address, "source": source, "interfaces": interfaces}))
"""

# The first node listens on the port for a short while, counting the other nodes' connections.
_LISTEN_PY = r"""
import socket, sys, time
port, wanted, wait_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", port))
except OSError as e:
    print("busy %s" % e.strerror, flush=True)
    sys.exit(0)
s.listen(16)
s.settimeout(0.2)
print("listening", flush=True)
deadline, seen = time.time() + wait_s, 0
while seen < wanted and time.time() < deadline:
    try:
        c, _ = s.accept()
        c.close()
        seen += 1
    except socket.timeout:
        pass
print("accepted %d" % seen, flush=True)
"""

_CONNECT_PY = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("ok")
except OSError as e:
    print("fail %s" % (e.strerror or e))
"""


def is_loopback(address: str) -> bool:
    """Whether an address (or name) only ever reaches the machine it is used on."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def excluded(interface: str) -> bool:
    return interface.startswith(EXCLUDED_PREFIXES)


def _pythons(python: str | None) -> list[str]:
    return [p for p in (python, "python3") if p]


def _first_python(pythons: list[str], script: str, args: list[str]) -> str:
    """A shell loop running `script` with the first interpreter there is (exit 3 when none)."""
    return (
        "for p in " + quote(pythons) + '; do command -v "$p" >/dev/null 2>&1 || continue; '
        f'exec "$p" -c {quote([script])} {quote(args)}; done; '
    )


@dataclass(frozen=True)
class Route:
    """How one node reaches the first node's address: through `interface`, from `source`."""

    address: str | None  # the rendezvous address as this node resolves it
    interface: str | None
    source: str | None
    interfaces: tuple[tuple[str, str], ...] = ()  # (name, IPv4) of every interface that has one
    error: str | None = None

    @property
    def usable(self) -> list[str]:
        """Interfaces NCCL would consider: not excluded, with an address."""
        return [name for name, _ in self.interfaces if not excluded(name)]


def route_from_probe(probe: dict) -> Route:
    """The probe's JSON (or what `ip` printed, parsed alike) -> the interface holding the source address."""
    if probe.get("error"):
        return Route(None, None, None, error=probe["error"])
    interfaces = tuple((str(n), str(a)) for n, a in probe.get("interfaces", []))
    source = probe.get("source")
    interface = next((n for n, a in interfaces if a == source), None) if source else None
    return Route(probe.get("address"), interface, source, interfaces)


def parse_ip_output(text: str) -> dict:
    """`ip -o -4 route get ADDR` (a ROUTE line) and `ip -o -4 addr show` (ADDR lines), as the probe's JSON."""
    probe: dict = {"interfaces": []}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        words = rest.split()
        if kind == "ROUTE" and words:
            if "src" in words:
                probe["source"] = words[words.index("src") + 1]
            probe["address"] = (
                words[1] if words[0] in ("local", "broadcast", "unicast") and len(words) > 1 else words[0]
            )
            if "dev" not in words:
                probe["error"] = rest.strip() or "no route"
        elif kind == "ADDR" and "inet" in words:
            name = words[0].split("@")[0]
            probe["interfaces"].append([name, words[words.index("inet") + 1].split("/")[0]])
    return probe


def find_route(remote: Remote, target: str, python: str | None = None) -> Route:
    """How this node reaches `target` (the first node's address): its Python's answer, or `ip`'s."""
    resolve = f"a=$(getent ahostsv4 {quote([target])} 2>/dev/null | awk 'NR==1{{print $1}}'); "
    script = (
        _first_python(_pythons(python), _ROUTE_PY, [target])
        + "command -v ip >/dev/null 2>&1 || exit 3; "
        + resolve
        + f'echo "ROUTE $(ip -o -4 route get "${{a:-{target}}}" 2>&1 | head -1)"; '
        "ip -o -4 addr show | sed 's/^[0-9]*: */ADDR /'"
    )
    r = remote.run(["sh", "-c", script], check=False, timeout_s=60)
    if r.code == 3:
        return Route(None, None, None, error="neither Python nor `ip` on the node to ask")
    out = r.stdout.strip()
    if out.startswith("{"):
        return route_from_probe(json.loads(out.splitlines()[-1]))
    return route_from_probe(parse_ip_output(out))


@dataclass(frozen=True)
class IfnameChoice:
    """What NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME) each node gets, and why."""

    per_node: dict[str, str]  # node name -> interface (absent: leave NCCL to choose)
    ok: bool
    message: str


def choose_ifname(rendezvous: str, routes: dict[str, Route], configured: str | None, group: str) -> IfnameChoice:
    """The group's nccl_socket_ifname when set; else, per node, the interface that reaches the first
    node, unless it is one NCCL skips (then say what to set). Pure: the routes were probed before."""
    if configured:
        # NCCL reads the names as prefixes ("=" for exact names, "^" for ones to avoid).
        wanted = configured.lstrip("=").split(",")
        missing = [
            n
            for n, r in routes.items()
            if not configured.startswith("^")
            and r.interfaces
            and not any(name.startswith(w) for name, _ in r.interfaces for w in wanted)
        ]
        if missing:
            return IfnameChoice(
                {n: configured for n in routes},
                False,
                f"nccl_socket_ifname = {configured!r} from [groups.{group}], but {missing[0]} has no "
                f"such interface ({', '.join(n for n, _ in routes[missing[0]].interfaces)})",
            )
        return IfnameChoice({n: configured for n in routes}, True, f"{configured} on every node (nccl_socket_ifname)")
    if is_loopback(rendezvous):
        return IfnameChoice(
            {n: "lo" for n in routes},
            True,
            f"lo: the rendezvous address {rendezvous} is loopback, so only nodes on the same machine "
            f"as the first can reach it",
        )
    per_node, shown, problems = {}, [], []
    for node, route in routes.items():
        if route.error or not route.interface:
            problems.append(f"{node}: {route.error or 'no interface holds the source address ' + str(route.source)}")
            continue
        shown.append(f"{node} {route.interface} ({route.source})")
        if excluded(route.interface):
            hint = (
                f'set nccl_socket_ifname = "{route.usable[0]}" in [groups.{group}]'
                if route.usable
                else "give the nodes an interface that reaches each other"
            )
            problems.append(f"{node} reaches {rendezvous} through {route.interface}, which NCCL skips; {hint}")
            continue
        per_node[node] = route.interface
    if problems:
        return IfnameChoice(per_node, False, "; ".join(problems))
    return IfnameChoice(per_node, True, ", ".join(shown) + " (NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME set to these)")


def socket_env(interface: str | None) -> dict[str, str]:
    """The variables that pin NCCL's and gloo's traffic to one interface."""
    return {"NCCL_SOCKET_IFNAME": interface, "GLOO_SOCKET_IFNAME": interface} if interface else {}


def check_port(
    first_name: str, first: Remote, others: dict[str, Remote], address: str, port: int, pythons: dict[str, str | None]
) -> dict[str, str]:
    """Listen on `port` on the first node for a moment and connect from every other node: per node,
    "ok" or why not (and under the key "" what stops the first node listening at all)."""
    wait_s = PROBE_TIMEOUT_S * (len(others) + 1) + 5
    listen = (
        _first_python(_pythons(pythons[first_name]), _LISTEN_PY, [str(port), str(len(others)), str(wait_s)]) + "exit 3"
    )
    channel = first.open(["sh", "-c", listen], timeout_s=wait_s + 30)
    reader = channel.makefile("rb")
    first_line = reader.readline().decode(errors="replace").strip()
    if not first_line.startswith("listening"):
        channel.close()
        if channel.recv_exit_status() == 3 or not first_line:
            return {"": f"no Python on {first_name} to listen on port {port} with (not checked)"}
        return {
            "": f"port {port} is in use on {first_name} ({first_line[5:].strip()}): another job's rendezvous? "
            f"set rendezvous_port to a free one"
        }
    results = {}
    try:
        for name, remote in others.items():
            # Without Python, bash's /dev/tcp (sh has none) under a time limit.
            tcp = quote(["timeout", str(PROBE_TIMEOUT_S), "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"])
            probe = (
                _first_python(_pythons(pythons.get(name)), _CONNECT_PY, [address, str(port), str(PROBE_TIMEOUT_S)])
                + f"{tcp} 2>/dev/null && echo ok || echo 'fail no answer'"
            )
            started = time.monotonic()
            out = remote.run(["sh", "-c", probe], check=False, timeout_s=PROBE_TIMEOUT_S + 30).stdout.strip()
            word = (out.splitlines() or ["fail no answer"])[-1]
            results[name] = (
                "ok"
                if word == "ok"
                else (
                    f"cannot connect to {address}:{port} ({word[5:] or 'no answer'} after {time.monotonic() - started:.0f}s)"
                )
            )
    finally:
        channel.close()
    return results
