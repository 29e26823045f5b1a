"""How a multi-node run ends: follow rank 0's log on the live display while every node's trainer is
watched; when one fails, stop the others (a peer waiting on a dead one waits long); then pull from
rank 0's machine, let every machine stop and confirm it, and record the end once, as run_end does
for one machine, with the cost summed over the nodes."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from gpu_run.backends import backend_for_run
from gpu_run.config import Group, Host
from gpu_run.errors import GpuRunError
from gpu_run.events import EXIT_STOPPED, parse_event
from gpu_run.ledger import Ledger, RunRecord
from gpu_run.money.cost import format_money
from gpu_run.multinode.nodes import (
    Node,
    NodeBoard,
    group_host,
    in_parallel,
    node_cost,
    nodes_cost,
    record_node_stop,
    save_nodes,
)
from gpu_run.providers.base import StopResult
from gpu_run.run_end import Detached, is_command_run, record_end
from gpu_run.ui import UI, TrainingDisplay

POLL_S = 2  # how often every node's trainer is asked whether it still runs
# A node whose fresh logins fail this many polls in a row once its peers have ended is down (the
# test a stop is confirmed by); while its peers still run, the laptop waits this long for it.
DOWN_AFTER_POLLS = 2
SILENT_WHILE_PEERS_RUN_S = 120
PEER_STOP_TIMEOUT_S = 10  # a peer of a failed node cannot save a consistent last.pth: a short stop
TAIL_LINES = 6  # of a failed node's log, shown under the error
# What a node that does not answer (or whose machine went down) raises at the laptop.
DROPPED = (GpuRunError, paramiko.SSHException, OSError, EOFError)


@dataclass
class NodeWatch:
    """What the laptop knows of one node's trainer while it follows the run."""

    code: int | None = None  # its exit code once it ended
    lost: bool = False  # its machine stopped answering and counts as down
    failures: int = 0  # polls in a row that could not reach it
    silent_since: float | None = None
    stopping: bool = False  # asked to stop (a peer failed, or `gpu-run stop`)

    @property
    def ended(self) -> bool:
        return self.code is not None or self.lost


@dataclass
class Outcome:
    watches: list[NodeWatch]
    rank0: int | None  # the node whose log carries rank 0's events
    cause: int | None = None  # the node whose end ended the job for the others
    stopped: bool = False  # rank 0 reported a resumable stop (`gpu-run stop`)
    done: bool = False  # rank 0 reported the last epoch done: every rank passed its last barrier
    waited_polls: int = 0  # polls a failure waited for a silent node to count as down
    tails: dict[int, list[str]] = field(default_factory=dict)

    def status_and_code(self) -> tuple[str, int | None]:
        """Rank 0's word first: it exits 0 only after the last epoch's barrier, which every rank reached."""
        codes = [w.code for w in self.watches]
        main = self.rank0 if self.rank0 is not None else 0
        if self.stopped:  # rank 0 saved a resumable last.pth at a step every rank agreed to stop at
            return "stopped", EXIT_STOPPED
        if codes[main] == 0 and (self.done or (self.cause is None and all(c in (None, 0) for c in codes))):
            return "succeeded", 0
        for i in ([self.cause] if self.cause is not None else []) + [main] + list(range(len(codes))):
            if codes[i] not in (None, 0):
                return "failed", codes[i]
        return "failed", -1


def group_of(run: RunRecord) -> Group:
    data = run.args["group"]
    return Group(**{**data, "hosts": tuple(data["hosts"])})


def hosts_of(nodes: list[Node]) -> dict[str, Host]:
    return {n.name: n.host for n in nodes}


def follow_and_finish(run: RunRecord, nodes: list[Node], ledger: Ledger, ui: UI) -> dict:
    """Show rank 0's live display until every node's trainer ended, then pull, stop and record.
    Ctrl-C raises Detached: the job goes on, and `gpu-run attach` picks it up again."""
    hosts = hosts_of(nodes)
    currency = nodes[0].host.currency

    def cost_line() -> str:
        if all(h.is_free for h in hosts.values()):
            return ""
        return format_money(nodes_cost(hosts, [n.record for n in nodes])[0], currency)

    ledger.update_run(run.run_id, status="running")
    for node in nodes:
        if node.backend is not None:
            try:
                node.backend.ensure_watchdog(node.record.run_handle(), ui)
            except DROPPED:
                pass  # a node that does not answer is found out by the polls below
    try:
        outcome = follow(nodes, Path(run.run_dir), ui, cost_line)
    except KeyboardInterrupt:
        ledger.update_run(run.run_id, status="detached")
        raise Detached(run.run_id) from None
    return finish_nodes(run, nodes, outcome, ledger, ui)


def follow(nodes: list[Node], run_dir: Path, ui: UI, cost_line) -> Outcome:
    """Every node's log into runs/<id>/nodes/, rank 0's into train.log and onto the display; every
    node polled for its end. Returns once each node's trainer ended or its machine is down."""
    lines: queue.Queue = queue.Queue()
    for node in nodes:
        threading.Thread(target=_follower, args=(node, lines), daemon=True, name=f"follow-{node.name}").start()
    (run_dir / "nodes").mkdir(exist_ok=True)
    watches = [NodeWatch(code=None, lost=node.backend is None) for node in nodes]
    outcome = Outcome(watches, rank0=None)
    buffered: dict[int, list[str]] = {i: [] for i in range(len(nodes))}
    followers_done: set[int] = set()
    node_logs = [open(node_log_path(run_dir, n), "w") for n in nodes]
    try:
        with TrainingDisplay(ui, cost_line) as display, open(run_dir / "train.log", "w") as train_log:

            def show(line: str) -> None:
                train_log.write(line + "\n")
                train_log.flush()
                event = display.feed(line)
                if event is not None and event.get("event") in ("stopped", "done"):
                    setattr(outcome, event["event"], True)

            def take(i: int, line) -> None:
                if not isinstance(line, str):
                    followers_done.add(i)
                    return
                node_logs[i].write(line + "\n")
                node_logs[i].flush()
                buffered[i].append(line)
                del buffered[i][:-200]
                if outcome.rank0 is None and parse_event(line) is not None:
                    # Only rank 0 prints events: this node's log is the run's.
                    outcome.rank0 = i
                    nodes[i].record.rank0 = True
                    for earlier in buffered[i]:
                        show(earlier)
                elif outcome.rank0 == i:
                    show(line)

            next_poll = 0.0
            while True:
                try:
                    take(*lines.get(timeout=0.5))
                except queue.Empty:
                    pass
                if time.monotonic() >= next_poll:
                    poll(nodes, watches, ui)
                    next_poll = time.monotonic() + POLL_S
                    react(nodes, outcome, ui)
                    if all(w.ended for w in watches):
                        break
            # The last lines of rank 0's log are on their way: wait a little for them.
            last = outcome.rank0 if outcome.rank0 is not None else 0
            deadline = time.monotonic() + 10
            while last not in followers_done and not watches[last].lost and time.monotonic() < deadline:
                try:
                    take(*lines.get(timeout=0.5))
                except queue.Empty:
                    pass
            if outcome.rank0 is None:  # no rank 0 ever spoke: the first node's log is the run's
                train_log.writelines(line + "\n" for line in buffered[0])
    finally:
        for f in node_logs:
            f.close()
    for i, node in enumerate(nodes):
        node.record.exit_code = watches[i].code
        outcome.tails[i] = [line for line in buffered[i] if parse_event(line) is None][-TAIL_LINES:]
    return outcome


def node_log_path(run_dir: Path, node: Node) -> Path:
    return run_dir / "nodes" / f"{node.record.index}-{node.name}.log"


def _follower(node: Node, lines: queue.Queue) -> None:
    """One node's log, over a connection of its own (the laptop's main one polls it meanwhile)."""
    index = node.record.index
    try:
        follower = backend_for_run(node.host, node.record.run_handle(), UI(quiet=True))
        for line in follower.follow_logs(node.record.run_handle()):
            lines.put((index, line))
    except Exception as e:  # a node that went down: the polls decide what it means
        lines.put((index, e))
        return
    lines.put((index, None))


def poll(nodes: list[Node], watches: list[NodeWatch], ui: UI) -> None:
    """Ask every node that has not ended whether its trainer did, all at once."""

    def ask(node: Node) -> int | None:
        code = node.backend.exit_code(node.record.run_handle())
        if code is not None:
            # This laptop pulls next: keep the machine up past its grace for that, from now on
            # (rank 0's machine holds the outputs, and the first one the others' exit barrier).
            node.backend.watchdog.hold(node.record.run_id)
        return code

    pending = [i for i, w in enumerate(watches) if not w.ended and not w.stopping]
    results = in_parallel(ask, [nodes[i] for i in pending])
    now = time.monotonic()
    for i, result in zip(pending, results):
        watch = watches[i]
        if isinstance(result, BaseException):
            if not isinstance(result, DROPPED):
                raise result
            watch.failures += 1
            watch.silent_since = watch.silent_since or now
            continue
        if watch.failures >= DOWN_AFTER_POLLS:
            ui.info(f"{nodes[i].label} answers again")
        watch.failures, watch.silent_since = 0, None
        watch.code = result
    others_ended = {i: all(w.ended for j, w in enumerate(watches) if j != i) for i in range(len(watches))}
    for i, watch in enumerate(watches):
        if watch.ended or watch.failures < DOWN_AFTER_POLLS:
            continue
        assert watch.silent_since is not None  # set at its first failed poll
        if others_ended[i] or now - watch.silent_since >= SILENT_WHILE_PEERS_RUN_S:
            watch.lost = True
        elif watch.failures == DOWN_AFTER_POLLS:
            ui.warn(f"{nodes[i].label} does not answer; its peers still run, so the job goes on for now")


def react(nodes: list[Node], outcome: Outcome, ui: UI) -> None:
    """A node that failed or went down ends the job: stop the trainers still running elsewhere,
    rather than let them wait on a peer that will never answer."""
    watches = outcome.watches
    if outcome.cause is not None or outcome.done:
        return  # after rank 0's last epoch, a peer's end (torchrun's exit barrier) cannot hurt the outputs
    failed = [i for i, w in enumerate(watches) if w.code not in (None, 0, EXIT_STOPPED)]
    lost = [i for i, w in enumerate(watches) if w.lost]
    running = [i for i, w in enumerate(watches) if not w.ended]
    # A machine that went down is what made its peers fail: while one does not answer, give it a
    # poll or two to count as down before blaming the peer that failed first. One that is down
    # after its peers ended well was stopped by its own watchdog.
    silent = any(w.failures and not w.ended for w in watches)
    if failed and not lost and silent and outcome.waited_polls < DOWN_AFTER_POLLS:
        outcome.waited_polls += 1
        return
    if failed:
        outcome.cause = lost[0] if lost else failed[0]
    elif lost and running:
        outcome.cause = lost[0]
    else:
        return
    node, watch = nodes[outcome.cause], watches[outcome.cause]
    what = "stopped answering: its machine is down" if watch.lost else f"failed with exit code {watch.code}"
    ui.error(
        f"{node.label} {what}"
        + (f"; stopping the job on {', '.join(nodes[i].name for i in running)}" if running else "")
    )
    for i in running:
        watches[i].stopping = True
        threading.Thread(target=_stop_node, args=(nodes[i], watches[i]), daemon=True).start()


def _stop_node(node: Node, watch: NodeWatch, timeout_s: int = PEER_STOP_TIMEOUT_S) -> None:
    try:
        node.backend.stop(node.record.run_handle(), timeout_s)
    except DROPPED:
        pass  # it went down too: the next polls find that out
    finally:
        watch.stopping = False


# The end ---------------------------------------------------------------------------------------------


def finish_nodes(run: RunRecord, nodes: list[Node], outcome: Outcome, ledger: Ledger, ui: UI) -> dict:
    """Pull from rank 0's machine, let every machine stop and confirm it, record the end."""
    run_dir = Path(run.run_dir)
    ended = time.time()
    status, exit_code = outcome.status_and_code()
    ledger.end_phase(run.run_id, "train", "ok" if status != "failed" else "failed", f"exit code {exit_code}", at=ended)
    explain(nodes, outcome, ui)
    source = nodes[outcome.rank0 if outcome.rank0 is not None else 0]
    extra: dict = {}
    with NodeBoard(ui) as board:
        # The other machines have nothing to pull: they may stop at once, during the pull.
        for node in nodes:
            if node is not source and node.backend is not None and not outcome.watches[node.record.index].lost:
                try:
                    node.backend.watchdog.mark_pulled(node.record.run_id)
                except DROPPED:
                    pass  # the release below confirms what became of it
        ledger.start_phase(run.run_id, "pull")
        try:
            if source.backend is None or outcome.watches[source.record.index].lost:
                raise GpuRunError(f"{source.name}, which held rank 0's outputs, is down")
            extra = source.backend.finish(source.record.run_handle(), run_dir, board.ui_for(source.name))
            ledger.end_phase(run.run_id, "pull", "ok")
        except DROPPED as e:
            ledger.end_phase(run.run_id, "pull", "failed", str(e)[:500])
            ui.error(f"could not pull the outputs from {source.name}: {e}")
        ledger.start_phase(run.run_id, "stop")
        release_all(nodes, board)
        ledger.end_phase(run.run_id, "stop", "ok" if all(not n.record.stop_open for n in nodes) else "failed")
    save_nodes(ledger, run.run_id, nodes)
    # Our trainer's outputs must all be here; a command's are whatever it wrote (its exit code decides).
    missing = (
        []
        if is_command_run(run)
        else [p for p in ("checkpoints/last.pth", "metrics.jsonl") if not (run_dir / p).is_file()]
    )
    if status == "succeeded" and missing:
        status = "failed"
        ui.error(f"every node exited 0 but {', '.join(missing)} did not arrive in {run_dir}")
    return record_nodes_end(ledger.get_run(run.run_id), nodes, status, exit_code, ended, ledger, extra)


def explain(nodes: list[Node], outcome: Outcome, ui: UI) -> None:
    """After a failure: how each node's trainer ended, and the last lines of the one that failed."""
    if outcome.done:
        for i, node in enumerate(nodes):
            if outcome.watches[i].code not in (None, 0):
                ui.warn(
                    f"{node.label} exited {outcome.watches[i].code} after rank 0 finished the last epoch "
                    f"(in torchrun's shutdown); the outputs are complete, its log is in nodes/"
                )
    if outcome.cause is None:
        return
    for i, node in enumerate(nodes):
        watch = outcome.watches[i]
        end = "down (no answer)" if watch.lost else f"exit code {watch.code}"
        ui.info(f"  {node.label}{', rank 0' if i == outcome.rank0 else ''}: {end}")
    tail = outcome.tails.get(outcome.cause) or []
    if tail:
        ui.info(f"  last lines of {nodes[outcome.cause].name}'s log (all of it in nodes/ of the run folder):")
        for line in tail:
            ui.info(f"    {line}")


def release_all(nodes: list[Node], board: NodeBoard) -> None:
    """Every machine's stop, followed and confirmed at once (each watchdog stops its own)."""

    def release(node: Node) -> StopResult:
        node_ui = board.ui_for(node.name)
        if node.backend is None:
            return retry_node_stop(node, node_ui)
        try:
            return node.backend.release(node.record.run_handle(), node_ui)
        except DROPPED as e:
            return StopResult(False, "unconfirmed", None, f"{node.name}: {e}")

    for node, result in zip(nodes, in_parallel(release, nodes)):
        if isinstance(result, BaseException):
            result = StopResult(False, "unconfirmed", None, str(result))
        record_node_stop(node.record, result)


def retry_node_stop(node: Node, ui: UI) -> StopResult:
    """A node's stop tried again from the laptop (its machine did not confirm one), as
    run_commands.retry_stop does for a run on one machine."""
    from gpu_run.errors import Unreachable

    try:
        backend = node.backend or backend_for_run(node.host, node.record.run_handle(), ui)
    except Unreachable as e:  # an instance the API says is not running, or a box that no longer answers
        return StopResult(True, "stopped", time.time(), f"{node.name} is down ({e})")
    node.backend = backend
    try:
        return backend.retry_stop(node.record.run_handle(), ui)
    except DROPPED as e:
        return StopResult(False, "unconfirmed", None, f"{node.name}: {e}")


def record_nodes_end(
    run: RunRecord,
    nodes: list[Node],
    status: str,
    exit_code: int | None,
    ended: float,
    ledger: Ledger,
    extra: dict | None = None,
) -> dict:
    """run_end.record_end with what a multi-node run adds: its nodes, its world size, and the cost
    as the sum of each node's billed span at its own price."""
    hosts = hosts_of(nodes)
    group = group_of(run)
    amount, billed = nodes_cost(hosts, [n.record for n in nodes], now=ended)
    per_node = []
    for node in nodes:
        a, b = node_cost(node.host, node.record, now=ended)
        per_node.append(
            {
                "host": node.name,
                "run_id": node.record.run_id,
                "rank0": node.record.rank0,
                "exit_code": node.record.exit_code,
                "billed_s": b,
                "amount": float(a),
                "stop": {
                    "ok": not node.record.stop_open,
                    "state": node.record.stop_state,
                    "detail": node.record.stop_detail,
                },
            }
        )
    override = {
        "nodes": [n.name for n in nodes],
        "world_size": run.args.get("world_size"),
        "cost": {"amount": float(amount), "currency": nodes[0].host.currency, "billed_s": billed},
        "node_results": per_node,
    }
    return record_end(
        run,
        group_host(group, list(hosts.values()), 0),
        status,
        exit_code,
        ended,
        ledger,
        extra=extra,
        override=override,
    )
