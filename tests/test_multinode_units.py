"""Pure logic of multi-node runs: groups in the config, the interface NCCL gets, the torchrun line,
the summed cost, and how the nodes' ends make the run's status. No test bed."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from gpu_run.backends.base import Job, RunHandle, launcher_argv
from gpu_run.config import Config, parse_groups, parse_hosts
from gpu_run.errors import ConfigError
from gpu_run.ledger import Ledger
from gpu_run.multinode.finish import NodeWatch, Outcome
from gpu_run.multinode.network import Route, choose_ifname, is_loopback, parse_ip_output, route_from_probe
from gpu_run.multinode.nodes import (
    Node,
    NodeRecord,
    group_host,
    node_run_id,
    nodes_cost,
    record_node_stop,
    records_of,
    save_nodes,
)
from gpu_run.multinode.start import local_addr
from gpu_run.providers.base import StopResult

HOSTS = {
    "box-a": {"ssh": "root@10.0.0.5:22", "price_per_hour": 2.0, "currency": "CNY", "stop_command": "shutdown"},
    "box-b": {"ssh": "root@10.0.0.6:22", "price_per_hour": 1.0, "currency": "CNY", "billing": "per_minute",
              "stop_command": "shutdown"},
    "t4": {"ssh": "t4", "price_per_hour": 0.5, "currency": "USD", "stop_command": "shutdown"},
}


def config(groups: dict | None = None) -> Config:
    document = {"hosts": HOSTS, **({"groups": groups} if groups else {})}
    hosts = parse_hosts(document)
    return Config(hosts=hosts, groups=parse_groups(document, hosts))


def test_a_group_and_a_comma_list_name_the_same_nodes():
    c = config({"pair": {"hosts": ["box-a", "box-b"], "rendezvous_host": "10.0.0.5", "rendezvous_port": 29500,
                         "nccl_socket_ifname": "eth0"}})
    pair = c.group("pair")
    assert pair.hosts == ("box-a", "box-b") and (pair.rendezvous_host, pair.rendezvous_port) == ("10.0.0.5", 29500)
    listed = c.group("box-a, box-b")
    assert listed.name == "box-a,box-b" and listed.hosts == ("box-a", "box-b") and listed.rendezvous_port == 29400
    assert c.group("box-a") is None  # one host is not a group


@pytest.mark.parametrize("target, message", [
    ("box-a,nope", "unknown host 'nope'"),
    ("box-a,local", "host local is the local Docker engine"),
    ("box-a,t4", "bill in CNY and USD"),
    ("box-a,box-a", "host box-a is listed twice"),
    ("box-a,", "an empty host name"),
])
def test_a_comma_list_that_cannot_be_one_job_is_refused(target, message):
    with pytest.raises(ConfigError, match=message):
        config().group(target)


@pytest.mark.parametrize("table, message", [
    ({"hosts": ["box-a"]}, "needs two hosts or more"),
    ({"hosts": "box-a,box-b"}, "hosts must be a list"),
    ({"hosts": ["box-a", "box-b"], "rendezvous_port": 70000}, "rendezvous_port must be a port"),
    ({"hosts": ["box-a", "box-b"], "rendezvous_host": "10.0.0.5:29400"}, "no port"),
    ({"hosts": ["box-a", "box-b"], "nccl_socket_ifname": "eth0; rm"}, "nccl_socket_ifname must name"),
    ({"hosts": ["box-a", "box-b"], "rdzv_port": 1}, "unknown setting 'rdzv_port'"),
])
def test_group_tables_are_validated_in_one_line(table, message):
    with pytest.raises(ConfigError, match=message):
        config({"pair": table})


def test_a_group_may_not_take_a_hosts_name():
    with pytest.raises(ConfigError, match="also a host's name"):
        config({"box-a": {"hosts": ["box-a", "box-b"]}})


def test_the_torchrun_line_for_one_node_of_several():
    job = Job(run_id="r-n1", trainer_args=["--epochs", "1"], data_dir="/d", out_dir="/o", nnodes=2, node_rank=1,
              rdzv_endpoint="10.0.0.5:29400", rdzv_id="r", local_addr="127.0.0.2")
    argv = launcher_argv("python3", 8, job)
    assert argv[:2] == ["python3", "-c"] and "from torch.distributed.run import main" in argv[2]
    assert argv[3:] == ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.5:29400",
                        "--rdzv-id=r", "--rdzv-conf=is_host=0", "--max-restarts=0", "--local-addr=127.0.0.2",
                        "-m", "trainer.train"]


def test_nodes_on_one_machine_get_loopback_addresses_of_their_own():
    assert [local_addr("127.0.0.1", i) for i in range(3)] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert local_addr("10.0.0.5", 1) == "" and is_loopback("localhost") and not is_loopback("box-a")
    assert node_run_id("20260101-000000-abcd", 0) == "20260101-000000-abcd"
    assert node_run_id("20260101-000000-abcd", 2) == "20260101-000000-abcd-n2"


def test_the_interface_is_read_from_ip_when_the_node_has_no_python():
    text = ("ROUTE 10.0.0.5 via 10.0.0.1 dev ens5 src 10.0.0.6 uid 0\n"
            "ADDR lo    inet 127.0.0.1/8 scope host lo\n"
            "ADDR docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\n"
            "ADDR ens5    inet 10.0.0.6/24 brd 10.0.0.255 scope global ens5\n")
    route = route_from_probe(parse_ip_output(text))
    assert (route.address, route.interface, route.source) == ("10.0.0.5", "ens5", "10.0.0.6")
    assert route.usable == ["ens5"]
    # On the first node its own address is local: the interface is the one holding it, not lo.
    own = parse_ip_output("ROUTE local 10.0.0.5 dev lo table local src 10.0.0.5 uid 0\n"
                          "ADDR lo    inet 127.0.0.1/8 scope host lo\nADDR eth0    inet 10.0.0.5/24 scope global eth0\n")
    assert route_from_probe(own).interface == "eth0"


def route(interface: str, source: str, *others: tuple[str, str]) -> Route:
    return Route("10.0.0.5", interface, source, ((interface, source), *others))


def test_nccl_gets_the_interface_that_reaches_the_first_node():
    choice = choose_ifname("10.0.0.5", {"box-a": route("eth0", "10.0.0.5"), "box-b": route("ens5", "10.0.0.6")},
                           None, "pair")
    assert choice.ok and choice.per_node == {"box-a": "eth0", "box-b": "ens5"}


def test_a_route_through_a_docker_bridge_says_what_to_set():
    choice = choose_ifname("10.0.0.5", {"box-a": route("eth0", "10.0.0.5"),
                                        "box-b": route("docker0", "172.17.0.1", ("eth1", "192.168.1.9"))}, None, "pair")
    assert not choice.ok and 'set nccl_socket_ifname = "eth1" in [groups.pair]' in choice.message
    assert "box-b" not in choice.per_node


def test_a_loopback_rendezvous_keeps_the_nodes_on_one_machine():
    choice = choose_ifname("127.0.0.1", {"a": route("lo", "127.0.0.1"), "b": route("lo", "127.0.0.1")}, None, "pair")
    assert choice.ok and choice.per_node == {"a": "lo", "b": "lo"} and "only nodes on the same machine" in choice.message


def test_a_configured_interface_a_node_lacks_is_a_problem():
    routes = {"box-a": route("eth0", "10.0.0.5"), "box-b": route("ens5", "10.0.0.6")}
    assert choose_ifname("10.0.0.5", routes, "eth", "pair").ok is False
    assert choose_ifname("10.0.0.5", routes, "eth,ens", "pair").per_node == {"box-a": "eth,ens", "box-b": "eth,ens"}


def test_the_cost_is_each_nodes_span_at_its_own_price():
    c = config()
    records = [NodeRecord("box-a", 0, "r", billed_from=0.0, billed_to=1800.0),  # 30 min at 2.0 per second
               NodeRecord("box-b", 1, "r-n1", billed_from=10.0, billed_to=70.5)]  # 60.5 s: 2 minutes at 1.0
    amount, billed = nodes_cost(c.hosts, records)
    assert amount == Decimal("1.00") + Decimal("0.03") and billed == 1800 + 120
    with pytest.raises(ConfigError, match="--budget over hosts billed per_minute and per_second"):
        group_host(c.group("box-a,box-b"), [c.hosts["box-a"], c.hosts["box-b"]], budget=5)
    as_one = group_host(c.group("box-a,box-b"), [c.hosts["box-a"], c.hosts["box-b"]], budget=0)
    assert as_one.price_per_hour == 3.0 and as_one.currency == "CNY"


def test_the_run_is_billed_until_its_last_node_is_confirmed_stopped(tmp_path):
    c = config()
    ledger = Ledger(tmp_path / "runs.db")
    ledger.create_run("r", "box-a,box-b", args_json=json.dumps({"nodes": ["box-a", "box-b"]}))
    nodes = [Node(NodeRecord("box-a", 0, "r", billed_from=100.0), c.hosts["box-a"]),
             Node(NodeRecord("box-b", 1, "r-n1", billed_from=105.0), c.hosts["box-b"])]
    record_node_stop(nodes[0].record, StopResult(True, "stopped", 200.0, "box-a stopped"))
    record_node_stop(nodes[1].record, StopResult(False, "unconfirmed", None, "box-b still answers"))
    save_nodes(ledger, "r", nodes, RunHandle(backend="ssh"))
    run = ledger.get_run("r")
    assert (run.billed_from, run.billed_to, run.stop_status) == (100.0, None, "unconfirmed") and run.stop_failed
    assert [r.stop_state for r in records_of(run)] == ["stopped", "unconfirmed"]
    record_node_stop(nodes[1].record, StopResult(True, "stopped", 230.0, "box-b stopped"))
    save_nodes(ledger, "r", nodes)
    run = ledger.get_run("r")
    assert (run.billed_to, run.stop_status) == (230.0, "stopped") and not run.stop_failed


@pytest.mark.parametrize("codes, lost, cause, events, expected", [
    ([0, 0], [], None, {"done"}, ("succeeded", 0)),
    ([1, None], [1], 1, set(), ("failed", 1)),  # a machine went down; its peer failed as a result
    ([0, None], [1], None, {"done"}, ("succeeded", 0)),  # down after the end: its watchdog stopped it
    ([0, 1], [], None, {"done"}, ("succeeded", 0)),  # a peer's torchrun failed after the last epoch
    ([1, 137], [], 1, set(), ("failed", 137)),
    ([1, 1], [], None, {"stopped"}, ("stopped", 75)),  # `gpu-run stop`: rank 0 saved a resumable last.pth
    ([None, None], [0, 1], 0, set(), ("failed", -1)),
])
def test_how_the_nodes_ends_make_the_runs_status(codes, lost, cause, events, expected):
    watches = [NodeWatch(code=c, lost=i in lost) for i, c in enumerate(codes)]
    outcome = Outcome(watches, rank0=0, cause=cause, stopped="stopped" in events, done="done" in events)
    assert outcome.status_and_code() == expected
