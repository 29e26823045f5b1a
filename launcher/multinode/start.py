"""`gpu-run train --host a,b`: one job over several machines, from a spec to torchrun running on
every node. The multi-node counterpart of pipeline.train, with its checks and its ledger record:
the nodes are reached, claimed, prepared and given the dataset in parallel; any node's failure
before the job runs stops every machine already claimed."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from gpu_run.backends import Job, bring_up
from gpu_run.backends.base import RunHandle
from gpu_run.cache import cached_dataset
from gpu_run.config import Config, Group
from gpu_run.errors import GpuRunError
from gpu_run.ledger import Ledger
from gpu_run.money.budget import check_budget, watchdog_max_runtime_s
from gpu_run.multinode.finish import follow_and_finish
from gpu_run.multinode.network import choose_ifname, find_route, is_loopback, socket_env
from gpu_run.multinode.nodes import (Node, NodeBoard, NodeRecord, first_error, group_host, in_parallel,
                                     node_run_id, record_node_stop, save_nodes)
from gpu_run.pipeline import (check_dataset, check_stop_setting, copy_resume_state, decide_cache, new_run_id,
                              plan_record, resume_source)
from gpu_run.spec import TrainSpec, check_spec
from gpu_run.ui import UI
from gpu_run.weights import resolve_weights

# A node that failed before the others started: they get this long to end before they are killed
# (they cannot save a consistent last.pth without their peer anyway).
ABORT_STOP_TIMEOUT_S = 10


def train_nodes(spec: TrainSpec, group: Group, config: Config, ledger: Ledger, ui: UI) -> dict:
    with ui.timed("options and hosts checked"):
        hosts = [config.host(name) for name in group.hosts]
        check_spec(spec)
        for host in hosts:
            check_stop_setting(host, spec.keep_alive, ui)
        as_one = group_host(group, hosts, spec.budget)
        previous = resume_source(ledger, spec.resume) if spec.resume else None
    with ui.timed("dataset checked"):
        info = check_dataset(spec.data, ui)
    with ui.timed("cache decided"):
        spec = decide_cache(spec, info, ui)
    with ui.timed("budget and weights"):
        budget_limit_s = check_budget(spec, as_one, info, ledger, ui)
        weights = resolve_weights(spec.weights, spec.model, ui, resuming=bool(spec.resume))

    run_id = new_run_id()
    run_dir = (spec.runs_dir / run_id).resolve()
    run_dir.mkdir(parents=True)
    resumed_from = copy_resume_state(previous, run_dir) if previous else None
    per_node = max(1, spec.gpus)
    plan = plan_record(spec, info, weights, nodes=list(group.hosts), group=asdict(group),
                       world_size=len(hosts) * per_node)
    ledger.create_run(
        run_id, group.name, model=spec.model, data_path=str(info.root.resolve()), dataset_id=info.dataset_id,
        run_dir=str(run_dir), args_json=json.dumps(plan), currency=as_one.currency, resumed_from=resumed_from,
    )
    ui.info(f"run {run_id} on {len(hosts)} nodes ({', '.join(group.hosts)}), {per_node} process(es) each, world size "
            f"{len(hosts) * per_node}: {spec.model}, {len(info.classes)} classes, {info.num_train} train / "
            f"{info.num_val} val images -> {run_dir}")
    nodes = [Node(NodeRecord(host=h.name, index=i, run_id=node_run_id(run_id, i)), h) for i, h in enumerate(hosts)]
    save_nodes(ledger, run_id, nodes, RunHandle(backend="ssh"))

    try:
        with NodeBoard(ui) as board:
            rendezvous = set_up(nodes, group, spec, info.root.resolve(), info.dataset_id, board, ledger, run_id, ui)
            ledger.update_run(run_id, backend="ssh")
            top = start_all(nodes, group, spec, rendezvous, run_dir, weights, budget_limit_s, as_one, resumed_from,
                            board, ledger, run_id)
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


def set_up(nodes: list[Node], group: Group, spec: TrainSpec, data_root: Path, data_id: str, board: NodeBoard,
           ledger: Ledger, run_id: str, ui: UI) -> str:
    """Every node reached and claimed, then prepared, then given the dataset, each step on all nodes
    at once (the syncs overlap). Returns the rendezvous address."""

    def connect(node: Node) -> None:
        # Billing starts with the run's first action on each machine.
        node.record.billed_from = None if node.host.is_free else time.time()
        node.backend = bring_up(node.host, board.ui_for(node.name), spec.accept_new_host_key)
        node.backend.check_stop(spec.keep_alive, board.ui_for(node.name))
        node.backend.claim(node.record.run_id, spec.keep_alive)

    with ledger.phase(run_id, "connect"), ui.timed("connect"):
        results = in_parallel(connect, nodes)
        save_nodes(ledger, run_id, nodes)
        raise_first(results)
    for node in nodes:
        ui.info(f"{node.label}: {node.backend.describe()}")
    # The address the other nodes reach the first one on: what the group says, else the first
    # node's SSH host name as this laptop knows it.
    rendezvous = group.rendezvous_host or nodes[0].backend.remote.target.hostname

    def prepare(node: Node) -> None:
        node.prepared = node.backend.prepare(board.ui_for(node.name))
        node.route = find_route(node.backend.remote, rendezvous, getattr(node.backend.runtime, "python", None))

    with ledger.phase(run_id, "build"), ui.timed("build"):
        raise_first(in_parallel(prepare, nodes, first_failure_ends=True))
    choice = choose_ifname(rendezvous, {n.name: n.route for n in nodes}, group.nccl_socket_ifname, group.name)
    (ui.info if choice.ok else ui.warn)(f"network interface: {choice.message}")
    for node in nodes:
        node.interface = choice.per_node.get(node.name)

    if spec.cache_size:
        resizing = f"resizing images to a short side of {spec.cache_size} px"
        with ui.timed("cache"), board.ui_for("here").progress(resizing, total=0) as update:
            data_root = cached_dataset(data_root, spec.cache_size, progress=update)
        data_id = f"{data_id}-s{spec.cache_size}"

    def stage(node: Node) -> None:
        node.data_dir = node.backend.stage_data(data_root, data_id, board.ui_for(node.name))

    with ledger.phase(run_id, "sync"), ui.timed("sync"):
        raise_first(in_parallel(stage, nodes, first_failure_ends=True))
    return rendezvous


def raise_first(results: list) -> None:
    error = first_error(results)
    if error is not None:
        raise error


def start_all(nodes: list[Node], group: Group, spec: TrainSpec, rendezvous: str, run_dir: Path, weights,
              budget_limit_s: int, as_one, resumed_from: str | None, board: NodeBoard, ledger: Ledger,
              run_id: str) -> RunHandle:
    """torchrun on every node: the first one first, since it hosts the rendezvous store the others join."""
    first_billed = min((n.record.billed_from for n in nodes if n.record.billed_from is not None), default=None)
    max_runtime_s = watchdog_max_runtime_s(spec, as_one, budget_limit_s, first_billed)

    def start(node: Node) -> None:
        job = Job(
            run_id=node.record.run_id, trainer_args=spec.trainer_args(), data_dir=node.data_dir,
            out_dir=node.backend.out_dir_for(node.record.run_id, run_dir),
            weights=str(weights.path) if weights.path else "none", gpus=spec.gpus,
            env={**spec.extra_env, **socket_env(node.interface)}, max_runtime_s=max_runtime_s,
            silence_s=int(spec.silence_minutes * 60), stop_timeout_s=spec.stop_timeout_s,
            keep_alive=spec.keep_alive, terminate=spec.terminate,
            # Every node resumes from the same last.pth: each rank loads the optimizer state itself.
            seed_dir=str(run_dir) if resumed_from else None,
            nnodes=len(nodes), node_rank=node.record.index, rdzv_endpoint=f"{rendezvous}:{group.rendezvous_port}",
            rdzv_id=run_id, local_addr=local_addr(rendezvous, node.record.index),
        )
        handle = node.backend.start(job, node.prepared, board.ui_for(node.name))
        handle.image_built, handle.device = node.prepared.image_built, node.prepared.device
        node.record.handle = asdict(handle)

    ledger.start_phase(run_id, "train")
    start(nodes[0])
    raise_first(in_parallel(start, nodes[1:]))
    first = replace(nodes[0].record.run_handle(), nodes=[])
    first.image_built = any(n.prepared.image_built for n in nodes)
    return first


def local_addr(rendezvous: str, index: int) -> str:
    """torchrun tells nodes apart by address and process id. Nodes on one machine (a loopback
    rendezvous), containers sharing its host name, can share both: each gets a loopback address of
    its own (all of 127.0.0.0/8 reaches the machine itself). Elsewhere torchrun's own choice stands."""
    return f"127.0.0.{index + 1}" if is_loopback(rendezvous) else ""


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
