"""The nodes of one multi-node run: what the ledger keeps of each (its host, its host-side run id,
its handle, its billed span and stop), their summed cost, the steps run on all of them at once, and
one live display those parallel steps share."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
from typing import TypeVar, cast

from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gpu_run.backends import Backend, Prepared, RunHandle
from gpu_run.config import Group, Host
from gpu_run.errors import ConfigError
from gpu_run.ledger import STOP_OPEN, Ledger, RunRecord
from gpu_run.money.cost import billed_seconds, cost_of
from gpu_run.multinode.network import Route
from gpu_run.providers.base import StopResult
from gpu_run.ui import UI

S = TypeVar("S")
T = TypeVar("T")


def node_run_id(run_id: str, index: int) -> str:
    """The run id on a node's machine: the run's own on the first, `-nI` after it on the others, so
    that two nodes sharing one machine never share a run folder, a container or a watchdog."""
    return run_id if index == 0 else f"{run_id}-n{index}"


@dataclass
class NodeRecord:
    """What the ledger keeps of one node (in the run's handle, under `nodes`)."""

    host: str
    index: int  # its place in the list; node 0 hosts the rendezvous store
    run_id: str  # the host-side run id (its run folder, container and watchdog)
    handle: dict = field(default_factory=dict)  # its RunHandle once its trainer started
    billed_from: float | None = None
    billed_to: float | None = None
    stop_state: str | None = None
    stop_detail: str | None = None
    exit_code: int | None = None
    # The rendezvous ranks nodes by host name and process id, not by their place in the list: the
    # node whose first process became rank 0 writes the outputs, and the laptop pulls from it.
    rank0: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> NodeRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def run_handle(self) -> RunHandle:
        """Its handle; before its trainer started, one that finds its run folder (for an abandon)."""
        return RunHandle.from_json(json.dumps(self.handle)) if self.handle else RunHandle(backend="ssh")

    @property
    def stop_open(self) -> bool:
        return self.stop_state is None or self.stop_state in STOP_OPEN


@dataclass
class Node:
    """One node while the laptop works with it: its record, its host and, once reached, its backend."""

    record: NodeRecord
    host: Host
    backend: Backend | None = None
    prepared: Prepared | None = None
    data_dir: str = ""
    route: Route | None = None  # how it reaches the first node
    interface: str | None = None  # what NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME become there
    code: tuple[str, str] = ("", "")  # a command's project mirror and packages folder there

    @property
    def name(self) -> str:
        return self.record.host

    @property
    def label(self) -> str:
        return f"{self.record.host} (node {self.record.index})"


def records_of(run: RunRecord) -> list[NodeRecord]:
    handle = RunHandle.from_json(run.handle_json)
    return [NodeRecord.from_dict(n) for n in (handle.nodes if handle else [])]


def is_multinode(run: RunRecord) -> bool:
    return bool(run.args.get("nodes"))


# Money ---------------------------------------------------------------------------------------------


def group_host(group: Group, hosts: list[Host], budget: float) -> Host:
    """The nodes as one machine for what a single host is asked (the budget, the currency): their
    prices add up; the billing rule is theirs when they share it."""
    billing = {h.billing for h in hosts}
    if budget and len(billing) > 1:
        raise ConfigError(
            f"--budget over hosts billed {' and '.join(sorted(billing))} cannot be enforced as one "
            f"deadline; give the nodes one billing rule, or leave --budget out"
        )
    return Host(
        name=group.name,
        kind="ssh",
        price_per_hour=sum(h.price_per_hour for h in hosts),
        currency=hosts[0].currency,
        billing=hosts[0].billing if len(billing) == 1 else "per_second",
        min_billed_s=max(h.min_billed_s for h in hosts),
        grace_s=max(h.grace_s for h in hosts),
    )


def node_cost(host: Host, record: NodeRecord, now: float | None = None) -> tuple[Decimal, int]:
    """One node's amount and billed seconds, so far while its machine runs."""
    if record.billed_from is None:
        return Decimal("0.00"), 0
    end = record.billed_to if record.billed_to is not None else (now or time.time())
    span = max(0.0, end - record.billed_from)
    return (
        cost_of(span, host.price_per_hour, host.billing, host.min_billed_s),
        billed_seconds(span, host.billing, host.min_billed_s),
    )


def nodes_cost(hosts: dict[str, Host], records: list[NodeRecord], now: float | None = None) -> tuple[Decimal, int]:
    """The run's cost: each node billed by its own rules for its own span, summed."""
    amount, billed = Decimal("0.00"), 0
    for record in records:
        a, b = node_cost(hosts[record.host], record, now)
        amount, billed = amount + a, billed + b
    return amount, billed


def record_node_stop(record: NodeRecord, result: StopResult) -> None:
    """As run_end.record_stop does for a run: billing closes only on a confirmed stop."""
    record.stop_state, record.stop_detail = result.state, result.detail
    if record.billed_from is not None and result.ok:
        record.billed_to = result.at or time.time()


def save_nodes(ledger: Ledger, run_id: str, nodes: list[Node], top: RunHandle | None = None) -> None:
    """The nodes' records into the run's handle, and the run's billed span and stop from theirs:
    billed from the first node's start to the last node's confirmed stop."""
    handle = top or RunHandle.from_json(ledger.get_run(run_id).handle_json) or RunHandle(backend="ssh")
    handle.nodes = [asdict(n.record) for n in nodes]
    froms = [n.record.billed_from for n in nodes if n.record.billed_from is not None]
    tos = [n.record.billed_to for n in nodes if n.record.billed_from is not None]
    fields_: dict = {
        "handle_json": handle.to_json(),
        "billed_from": min(froms) if froms else None,
        "billed_to": max(cast("list[float]", tos)) if froms and None not in tos else None,
    }
    stopped = [n.record for n in nodes if n.record.stop_state is not None]
    if stopped:
        open_ = [r for r in stopped if r.stop_state in STOP_OPEN]
        fields_["stop_status"] = (
            open_[0].stop_state
            if open_
            else next((r.stop_state for r in stopped if r.stop_state == "stopped"), stopped[0].stop_state)
        )
        fields_["stop_detail"] = "; ".join(f"{r.host}: {r.stop_detail}" for r in stopped)
    ledger.update_run(run_id, **fields_)


# Steps on every node at once -------------------------------------------------------------------------


def in_parallel(step: Callable[[S], T], items: list[S], first_failure_ends: bool = False) -> list[T | BaseException]:
    """Run `step` on every item (a node, a host) in its own thread; each one's result or the
    exception it raised. With first_failure_ends, return at the first failure (the rest go on in
    the background, and their results read as None): the caller then ends them all."""
    done: queue.Queue = queue.Queue()
    results: list = [None] * len(items)

    def run(i: int, item: S) -> None:
        try:
            done.put((i, step(item)))
        except BaseException as e:  # the caller decides; nothing is lost in a thread
            done.put((i, e))

    for i, item in enumerate(items):
        threading.Thread(target=run, args=(i, item), daemon=True, name=f"node-{getattr(item, 'name', i)}").start()
    for _ in items:
        i, result = done.get()  # Ctrl-C in the main thread interrupts the wait
        results[i] = result
        if first_failure_ends and isinstance(result, BaseException):
            break
    return results


def first_error(results: list) -> BaseException | None:
    return next((r for r in results if isinstance(r, BaseException)), None)


# One live display for the nodes' steps ------------------------------------------------------------------


class NodeBoard:
    """A line per node step (a bar for a transfer, a spinner for a wait) in one live display: the
    nodes' steps run in threads at once, and a terminal holds one live display only."""

    def __init__(self, ui: UI):
        self.ui = ui
        self.progress: Progress | None = None

    def __enter__(self) -> NodeBoard:
        if not self.ui.quiet:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[amount]}"),
                TimeElapsedColumn(),
                console=self.ui.console,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def ui_for(self, name: str) -> UI:
        """What the step for `name` (a node's host, or "here" for the laptop) says goes on the board."""
        return NodeUI(self, name)


class NodeUI(UI):
    """A node's messages, named by its host, on the board's display."""

    def __init__(self, board: NodeBoard, name: str):
        super().__init__(quiet=board.ui.quiet, console=board.ui.console, verbose=board.ui.verbose)
        self.board, self.name = board, name

    def info(self, message: str) -> None:
        super().info(f"{self.name}: {message}")

    def warn(self, message: str) -> None:
        super().warn(f"{self.name}: {message}")

    def error(self, message: str) -> None:
        super().error(f"{self.name}: {message}")

    @contextmanager
    def spinner(self, message: str) -> Iterator:
        progress = self.board.progress
        if progress is None:
            with super().spinner(message) as status:
                yield status
            return
        task = progress.add_task(escape(f"{self.name}: {message}"), total=None, amount="")
        live, name = progress, self.name  # for Status, whose own self is the status, not this UI

        class Status:
            def update(self, text: str) -> None:
                live.update(task, description=escape(f"{name}: {text}"))

        try:
            yield Status()
        finally:
            progress.remove_task(task)

    @contextmanager
    def progress(self, description: str, total: int, unit: str = "files") -> Iterator[Callable[..., None]]:
        progress = self.board.progress
        if progress is None:
            with super().progress(description, total, unit) as plain_update:
                yield plain_update
            return
        task = progress.add_task(escape(f"{self.name}: {description}"), total=total or None, amount="")
        state = {"completed": 0, "total": total}

        def shown() -> str:
            done, whole = state["completed"], state["total"]
            if unit == "bytes":
                return f"{done / 1e6:.1f}/{whole / 1e6:.1f} MB" if whole else f"{done / 1e6:.1f} MB"
            return f"{done}/{whole}" if whole else str(done)

        def update(completed: int | None = None, total: int | None = None, advance: int = 0) -> None:
            if completed is not None:
                state["completed"] = completed
            if total is not None:
                state["total"] = total
            state["completed"] += advance
            progress.update(task, completed=state["completed"], total=state["total"] or None, amount=shown())

        try:
            yield update
        finally:
            progress.update(task, visible=True)  # a finished transfer stays on the board, as a bar does
