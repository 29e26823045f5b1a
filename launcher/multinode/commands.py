"""The commands on a multi-node run that exists (attach, stop, pull, status, logs): each reconnects
to every node it can and ends the run through multinode.finish, as run_commands does for a run on
one machine."""

from __future__ import annotations

import time
from pathlib import Path

from gpu_run.backends import backend_for_run
from gpu_run.config import Config
from gpu_run.errors import GpuRunError, Unreachable
from gpu_run.events import parse_event, read_metrics
from gpu_run.ledger import ACTIVE_STATUSES, Ledger, RunRecord
from gpu_run.multinode.finish import (
    DROPPED,
    NodeWatch,
    Outcome,
    finish_nodes,
    follow_and_finish,
    node_log_path,
    record_nodes_end,
    retry_node_stop,
)
from gpu_run.multinode.nodes import Node, NodeBoard, in_parallel, record_node_stop, records_of, save_nodes
from gpu_run.providers.base import StopResult
from gpu_run.run_commands import stop_timeout_of
from gpu_run.ui import UI


def nodes_of(run: RunRecord, config: Config, ui: UI, connect: bool = True) -> list[Node]:
    """The run's nodes from the ledger, each reconnected at once where it answers (a node whose
    machine is down has no backend)."""
    nodes = [Node(record, config.host(record.host)) for record in records_of(run)]
    if connect:

        def reach(node: Node) -> None:
            node.backend = backend_for_run(node.host, node.record.run_handle(), UI(quiet=True))

        for _node, result in zip(nodes, in_parallel(reach, nodes)):
            if isinstance(result, BaseException) and not isinstance(result, DROPPED):
                raise result
    return nodes


def attach(run: RunRecord, config: Config, ledger: Ledger, ui: UI) -> dict:
    if run.status == "created":
        return settle_abandoned_setup(run, config, ledger, ui)
    if run.status not in ACTIVE_STATUSES:
        ui.info(f"run {run.run_id} already ended ({run.status})")
        return run.summary or {"run_id": run.run_id, "status": run.status}
    return follow_and_finish(run, nodes_of(run, config, ui), ledger, ui)


def settle_abandoned_setup(run: RunRecord, config: Config, ledger: Ledger, ui: UI) -> dict:
    """The laptop died while preparing the run: each node's watchdog releases its machine once the
    laptop goes quiet; record the run as failed and confirm every stop."""
    ui.warn(f"run {run.run_id} never started: the laptop stopped during its setup")
    ledger.update_run(run.run_id, status="failed", ended_at=time.time())
    for phase in ledger.phases(run.run_id):
        if phase.ended_at is None:
            ledger.end_phase(run.run_id, phase.phase, "failed", "the laptop stopped during setup")
    nodes = nodes_of(run, config, ui, connect=False)

    def abandon(node: Node) -> StopResult:
        try:
            return backend_for_run(node.host, node.record.run_handle(), ui).abandon(node.record.run_id, ui)
        except Unreachable as e:
            return StopResult(True, "stopped", time.time(), f"{node.name} is down ({e})")

    for node, result in zip(nodes, in_parallel(abandon, nodes)):
        if isinstance(result, BaseException):
            result = StopResult(False, "unconfirmed", None, f"{node.name}: {result}")
        record_node_stop(node.record, result)
    save_nodes(ledger, run.run_id, nodes)
    run = ledger.get_run(run.run_id)
    return {
        "run_id": run.run_id,
        "status": "failed",
        "run_dir": run.run_dir,
        "stop": {"ok": not run.stop_failed, "state": run.stop_status, "detail": run.stop_detail},
    }


def stop(run: RunRecord, config: Config, ledger: Ledger, ui: UI) -> dict:
    """Ask every node's trainer to stop (rank 0 writes last.pth at a step all ranks agree on), then
    pull and record as at a normal end. A run whose machines were not all confirmed stopped gets
    their stops tried again."""
    if run.status not in ACTIVE_STATUSES:
        if run.stop_failed:
            return retry_stop(run, config, ledger, ui)
        ui.info(f"run {run.run_id} already ended ({run.status})")
        return run.summary or {"run_id": run.run_id, "status": run.status}
    nodes = nodes_of(run, config, ui)
    timeout_s = stop_timeout_of(run)

    def stop_node(node: Node) -> int | None:
        if node.backend is None:
            return None
        node.backend.stop(node.record.run_handle(), timeout_s)
        return node.backend.exit_code(node.record.run_handle())

    with ui.spinner(f"stopping {run.run_id} on {len(nodes)} nodes: rank 0 finishes its step and saves last.pth"):
        codes = in_parallel(stop_node, nodes)
    return finish_nodes(run, nodes, outcome_from_logs(run, nodes, codes), ledger, ui)


def outcome_from_logs(run: RunRecord, nodes: list[Node], codes: list) -> Outcome:
    """How the job ended, without having followed it: each node's exit code as found, rank 0's node
    from the logs (only rank 0 prints events), and train.log and nodes/ written as a follow would."""
    run_dir = Path(run.run_dir)
    (run_dir / "nodes").mkdir(exist_ok=True)
    watches, logs = [], []
    for node, code in zip(nodes, codes):
        lost = node.backend is None or isinstance(code, BaseException)
        watches.append(NodeWatch(code=None if lost else code, lost=lost))
        lines = []
        if not lost:
            try:
                lines = node.backend.read_logs(node.record.run_handle())
            except DROPPED:
                pass
        logs.append(lines)
        node_log_path(run_dir, node).write_text("".join(line + "\n" for line in lines))
        node.record.exit_code = None if lost else code
    rank0 = next((i for i, lines in enumerate(logs) if any(parse_event(line) for line in lines)), None)
    if rank0 is None:
        rank0 = next((i for i, n in enumerate(nodes) if n.record.rank0), None)
    for i, node in enumerate(nodes):
        node.record.rank0 = i == rank0
    shown = logs[rank0 if rank0 is not None else 0]
    if shown:
        (run_dir / "train.log").write_text("".join(line + "\n" for line in shown))
    events = {(parse_event(line) or {}).get("event") for line in shown}
    return Outcome(watches, rank0, stopped="stopped" in events, done="done" in events)


def retry_stop(run: RunRecord, config: Config, ledger: Ledger, ui: UI) -> dict:
    """Stop the machines of an ended run whose stops failed; each confirmed stop closes its billing."""
    ui.warn(f"the machines of run {run.run_id} were not all confirmed stopped ({run.stop_detail}); trying again")
    nodes = nodes_of(run, config, ui, connect=False)
    open_nodes = [n for n in nodes if n.record.stop_open]
    with NodeBoard(ui) as board:
        results = in_parallel(lambda node: retry_node_stop(node, board.ui_for(node.name)), open_nodes)
    for node, result in zip(open_nodes, results):
        if isinstance(result, BaseException):
            result = StopResult(False, "unconfirmed", None, f"{node.name}: {result}")
        record_node_stop(node.record, result)
    save_nodes(ledger, run.run_id, nodes)
    run = ledger.get_run(run.run_id)
    summary = run.summary
    if not summary:  # a run whose setup failed has no summary: say what its machines did
        return {
            "run_id": run.run_id,
            "status": run.status,
            "run_dir": run.run_dir,
            "stop": {"ok": not run.stop_failed, "state": run.stop_status, "detail": run.stop_detail},
        }
    return record_nodes_end(
        run, nodes, summary["status"], summary.get("exit_code"), run.ended_at or time.time(), ledger, extra=summary
    )


def pull(run: RunRecord, config: Config, ledger: Ledger, ui: UI) -> dict:
    """Fetch what rank 0's machine has produced; a run whose trainers all ended is finished as at a
    normal end."""
    nodes = nodes_of(run, config, ui)
    if run.status in ACTIVE_STATUSES:

        def code(node: Node) -> int | None:
            return node.backend.exit_code(node.record.run_handle()) if node.backend else None

        codes = in_parallel(code, nodes)
        if all(node.backend is None or c is not None for node, c in zip(nodes, codes)):
            return finish_nodes(run, nodes, outcome_from_logs(run, nodes, codes), ledger, ui)
    source = rank0_node(nodes)
    if source.backend is None:
        raise GpuRunError(
            f"{source.name}, which holds rank 0's outputs of run {run.run_id}, does not answer; "
            f"start its machine and pull again"
        )
    source.backend.pull(source.record.run_handle(), Path(run.run_dir), ui)
    return {"run_id": run.run_id, "status": run.status, "run_dir": run.run_dir}


def rank0_node(nodes: list[Node]) -> Node:
    """The node whose first process became rank 0 (it holds the outputs): as recorded, else the
    one whose log carries events, else the first."""
    recorded = next((n for n in nodes if n.record.rank0), None)
    if recorded is not None:
        return recorded
    for node in nodes:
        if node.backend is None:
            continue
        try:
            if any(parse_event(line) for line in node.backend.read_logs(node.record.run_handle())):
                return node
        except DROPPED:
            continue
    return nodes[0]


def live_status(run: RunRecord, config: Config, ledger: Ledger, state: dict) -> dict:
    """run_commands.live_status's state, with each node's trainer as its machine reports it."""
    records = records_of(run)
    state["nodes"] = [
        {
            "host": r.host,
            "node": r.index,
            "run_id": r.run_id,
            "rank0": r.rank0,
            "exit_code": r.exit_code,
            "stop": {"state": r.stop_state, "detail": r.stop_detail},
        }
        for r in records
    ]
    state["world_size"] = run.args.get("world_size")
    if run.status not in ACTIVE_STATUSES or not any(r.handle for r in records):
        return state
    metrics_path = Path(run.run_dir) / "metrics.jsonl"
    metrics = read_metrics(metrics_path.read_text()) if metrics_path.is_file() else []
    if metrics:
        state["last_epoch"] = metrics[-1]
    nodes = nodes_of(run, config, UI(quiet=True))
    trainers = []
    for node, entry in zip(nodes, state["nodes"]):
        if node.backend is None:
            entry["trainer"] = "unknown: its machine does not answer"
        else:
            try:
                code = node.backend.exit_code(node.record.run_handle())
                entry["trainer"] = "running" if code is None else f"ended with exit code {code}"
            except GpuRunError as e:
                entry["trainer"] = f"unknown: {e}"
        trainers.append(f"{node.name} {entry['trainer']}")
    state["trainer"] = "; ".join(trainers)
    return state


def log_lines(run: RunRecord, follow: bool, config: Config, ui: UI):
    """Rank 0's log: from its machine while the run is live, else the saved train.log."""
    saved = Path(run.run_dir or "") / "train.log"
    if run.status in ACTIVE_STATUSES and any(r.handle for r in records_of(run)):
        source = rank0_node(nodes_of(run, config, ui))
        if source.backend is not None:
            handle = source.record.run_handle()
            yield from source.backend.follow_logs(handle) if follow else source.backend.read_logs(handle)
            return
    if not saved.is_file():
        raise GpuRunError(f"run {run.run_id} has no train.log in {run.run_dir}")
    yield from saved.read_text().splitlines()
