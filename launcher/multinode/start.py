"""`gpu-run train --host a,b`: one job over several machines, torchrun on every node. The driver's
lifecycle (driver.py) with N machines: the same checks and plan (run_plan), the same setup stages,
each run on every node at once (the syncs overlap), and any node's failure before the job runs
stops every machine already claimed. Our trainer or a user's `python SCRIPT` command alike."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from gpu_run.backends.base import RunHandle
from gpu_run.config import Config, Group
from gpu_run.driver import claim, connect, data_source, job_for, prepare, sync_code, sync_data
from gpu_run.errors import ConfigError, GpuRunError
from gpu_run.ledger import Ledger
from gpu_run.money.budget import watchdog_max_runtime_s
from gpu_run.multinode.finish import follow_and_finish
from gpu_run.multinode.network import Route, choose_ifname, find_route, is_loopback, socket_env
from gpu_run.multinode.nodes import (
    Node,
    NodeBoard,
    NodeRecord,
    first_error,
    group_host,
    in_parallel,
    node_run_id,
    record_node_stop,
    save_nodes,
)
from gpu_run.project import is_python_script
from gpu_run.run_plan import RunPlan, open_run, plan_run
from gpu_run.spec import TrainSpec
from gpu_run.ui import UI

# A node that failed before the others started: they get this long to end before they are killed
# (they cannot save a consistent last.pth without their peer anyway).
ABORT_STOP_TIMEOUT_S = 10


def train_nodes(spec: TrainSpec, group: Group, config: Config, ledger: Ledger, ui: UI) -> dict:
    hosts = [config.host(name) for name in group.hosts]
    if spec.is_command and not is_python_script(spec.command or []):
        raise ConfigError(
            "on several hosts your command runs under torchrun, so it must be `python SCRIPT ...` "
            "(a DDP script reads torchrun's environment); run other commands on one host"
        )
    plan = plan_run(spec, group_host(group, hosts, spec.budget), ledger, ui, machines=hosts)
    spec = plan.spec
    per_node = max(1, spec.gpus)
    run = open_run(
        plan,
        ledger,
        group.name,
        plan_extra={"nodes": list(group.hosts), "group": asdict(group), "world_size": len(hosts) * per_node},
    )
    run_id, run_dir = run.run_id, Path(run.run_dir)
    what = (
        f"{plan.job_label}"
        if plan.info is None or plan.project is not None
        else f"{spec.model}, {len(plan.info.classes)} classes, {plan.info.num_train} train / {plan.info.num_val} val images"
    )
    ui.info(
        f"run {run_id} on {len(hosts)} nodes ({', '.join(group.hosts)}), {per_node} process(es) each, world size "
        f"{len(hosts) * per_node}: {what} -> {run_dir}"
    )
    nodes = [Node(NodeRecord(host=h.name, index=i, run_id=node_run_id(run_id, i)), h) for i, h in enumerate(hosts)]
    save_nodes(ledger, run_id, nodes, RunHandle(backend="ssh"))

    try:
        with NodeBoard(ui) as board:
            rendezvous = set_up(nodes, group, plan, board, ledger, run_id, ui)
            ledger.update_run(run_id, backend="ssh")
            top = start_all(nodes, group, plan, rendezvous, run_dir, bool(run.resumed_from), board, ledger, run_id)
        save_nodes(ledger, run_id, nodes, top)
        ledger.update_run(run_id, status="running", image_tag=nodes[0].prepared.image_tag)
    except BaseException as e:
        ledger.update_run(run_id, status="failed", ended_at=time.time())
        if isinstance(e, GpuRunError):
            ledger.end_phase(run_id, "train", "failed", str(e))
        release_after_failed_setup(nodes, spec.keep_alive, ui)
        save_nodes(ledger, run_id, nodes)
        raise

    if spec.detach:
        ledger.update_run(run_id, status="detached")
        ui.info(f"started detached on {len(nodes)} nodes. Follow with: gpu-run attach {run_id}")
        return {"run_id": run_id, "status": "detached", "run_dir": str(run_dir), "nodes": list(group.hosts)}
    return follow_and_finish(ledger.get_run(run_id), nodes, ledger, ui)


def set_up(
    nodes: list[Node], group: Group, plan: RunPlan, board: NodeBoard, ledger: Ledger, run_id: str, ui: UI
) -> str:
    """The driver's setup stages, each on all nodes at once (the syncs overlap): every node reached
    and claimed, then prepared, then given the dataset (and a command's project). Returns the
    rendezvous address."""

    def reach(node: Node) -> None:
        # Billing starts with the run's first action on each machine.
        node.record.billed_from = None if node.host.is_free else time.time()
        node.backend = connect(node.host, plan.spec, board.ui_for(node.name))
        claim(node.backend, plan.spec, node.record.run_id, board.ui_for(node.name))

    with ledger.phase(run_id, "connect"), ui.timed("connect"):
        results = in_parallel(reach, nodes)
        save_nodes(ledger, run_id, nodes)
        raise_first(results)
    for node in nodes:
        ui.info(f"{node.label}: {node.backend.describe()}")
    # The address the other nodes reach the first one on: what the group says, else the first
    # node's SSH host name as this laptop knows it.
    rendezvous = group.rendezvous_host or nodes[0].backend.remote.target.hostname

    def build(node: Node) -> None:
        node.prepared = prepare(node.backend, board.ui_for(node.name))
        node.route = find_route(node.backend.remote, rendezvous, getattr(node.backend.runtime, "python", None))

    with ledger.phase(run_id, "build"), ui.timed("build"):
        raise_first(in_parallel(build, nodes, first_failure_ends=True))
    choice = choose_ifname(rendezvous, {n.name: n.route for n in nodes}, group.nccl_socket_ifname, group.name)
    (ui.info if choice.ok else ui.warn)(f"network interface: {choice.message}")
    for node in nodes:
        node.interface = choice.per_node.get(node.name)

    source = data_source(plan, board.ui_for("here"))  # once, for every node

    def stage(node: Node) -> None:
        node.data_dir = sync_data(node.backend, source, board.ui_for(node.name))

    if source is not None:
        with ledger.phase(run_id, "sync"), ui.timed("sync"):
            raise_first(in_parallel(stage, nodes, first_failure_ends=True))

    def code(node: Node) -> None:
        node.code = sync_code(node.backend, plan, board.ui_for(node.name))

    if plan.project is not None:
        with ledger.phase(run_id, "code"), ui.timed("code"):
            raise_first(in_parallel(code, nodes, first_failure_ends=True))
    return rendezvous


def raise_first(results: list) -> None:
    error = first_error(results)
    if error is not None:
        raise error


def start_all(
    nodes: list[Node],
    group: Group,
    plan: RunPlan,
    rendezvous: str,
    run_dir: Path,
    resumed: bool,
    board: NodeBoard,
    ledger: Ledger,
    run_id: str,
) -> RunHandle:
    """torchrun on every node: the first one first, since it hosts the rendezvous store the others join."""
    spec = plan.spec
    first_billed = min((n.record.billed_from for n in nodes if n.record.billed_from is not None), default=None)
    max_runtime_s = watchdog_max_runtime_s(spec, plan.host, plan.budget_limit_s, first_billed)

    def start(node: Node) -> None:
        # Every node resumes from the same last.pth (or the same files of a command): each rank
        # loads its state itself.
        job = job_for(
            plan,
            node.backend,
            node.record.run_id,
            run_dir,
            node.data_dir,
            node.code,
            max_runtime_s,
            resumed=resumed,
            nnodes=len(nodes),
            node_rank=node.record.index,
            rdzv_endpoint=f"{rendezvous}:{group.rendezvous_port}",
            rdzv_id=run_id,
            local_addr=local_addr(rendezvous, node.record.index, node.route),
        )
        job.env.update(socket_env(node.interface))
        handle = node.backend.start(job, node.prepared, board.ui_for(node.name))
        handle.image_built, handle.device = node.prepared.image_built, node.prepared.device
        node.record.handle = asdict(handle)

    ledger.start_phase(run_id, "train")
    start(nodes[0])
    raise_first(in_parallel(start, nodes[1:]))
    first = replace(nodes[0].record.run_handle(), nodes=[])
    first.image_built = any(n.prepared.image_built for n in nodes)
    return first


def local_addr(rendezvous: str, index: int, route: Route | None = None) -> str:
    """The address the other nodes reach this one by, given to torchrun explicitly (left to itself,
    torch hands out the node's host name, which its peers often cannot resolve). Nodes on one
    machine (a loopback rendezvous), containers sharing its host name, each get a loopback address
    of their own (all of 127.0.0.0/8 reaches the machine itself). Elsewhere: the first node is
    reached at the rendezvous address as the nodes resolve it, and every other node by the source
    address of its route to the first (what doctor measures)."""
    if is_loopback(rendezvous):
        return f"127.0.0.{index + 1}"
    if route is None:
        return ""
    if index == 0:
        return route.address or ""
    return route.source or ""


def release_after_failed_setup(nodes: list[Node], keep_alive: bool, ui: UI) -> None:
    """Setup failed on a node: every machine already claimed must not stay up (and bill), and a
    trainer already started waits for a peer that will never come."""

    with NodeBoard(ui) as board:

        def release_on_board(node: Node) -> None:
            ui_node = board.ui_for(node.name)
            if node.backend is not None:  # claimed or not: a cloud instance started for it stops too
                try:
                    if node.record.handle:
                        node.backend.stop(node.record.run_handle(), ABORT_STOP_TIMEOUT_S)
                    record_node_stop(node.record, node.backend.abort(ui_node, keep_alive))
                except Exception as e:  # the setup's own error is the one to show
                    node.record.stop_state, node.record.stop_detail = "unconfirmed", str(e)
                    ui.error(f"NOT STOPPED: could not release {node.name} after the failed setup ({e})")
            elif node.record.billed_from is not None and node.record.billed_to is None:
                node.record.billed_to = time.time()  # never reached: nothing of ours runs there

        in_parallel(release_on_board, nodes)
