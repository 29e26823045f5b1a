"""What the dashboard's pages show, read from the ledger and the run folders; no HTML here.

A run folder holds what a host wrote (metrics.jsonl, train.log, file names): every string read from
it is data for the page to show as text, never markup. Reading is bounded (the log's tail, the
metrics file's last megabytes, a cap on the files listed) so that a huge or hostile file cannot
stall a page or the dashboard's memory.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_run.config import Config
from gpu_run.events import read_metrics_lenient
from gpu_run.host_text import safe
from gpu_run.ledger import ACTIVE_STATUSES, Ledger, RunRecord, SweepRecord

LOG_TAIL_BYTES = 256 * 1024  # what the page reads of train.log: its last lines, not the whole file
LOG_TAIL_LINES = 200
METRICS_MAX_BYTES = 4 * 1024 * 1024  # an epoch is one short line: this is thousands of epochs
MAX_LISTED_FILES = 500  # a command's work/ folder may hold many thousands
MAX_TEXT = 300  # a host's value shown in a table cell
# Runs on one page of the runs table: a page of 200 lays out in a fraction of a second on a
# small laptop however long the ledger grows; ?all=1 shows every run on one page.
RUNS_PER_PAGE = 200
MAX_NAME = 80  # a metric name from a host
# The curves: (chart, metric keys) in the trainer's format; a user's script may write the short names.
CHART_KEYS = {"loss": ("train_loss", "val_loss", "loss"), "accuracy": ("train_acc", "val_acc", "acc", "accuracy")}
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg")  # shown inline on the run's page; anything else is a download


# The runs table ----------------------------------------------------------------------------------

@dataclass
class RunRow:
    """One line of the runs table, as text ready to show."""

    run_id: str
    host: str
    nodes: list[str]
    job: str
    job_kind: str  # trainer | command
    status: str
    active: bool
    best_acc: str
    duration: str
    cost: str
    stop_state: str
    stop_failed: bool
    stop_detail: str
    started: str
    created_at: float
    sweep_id: str | None
    sweep_point: int | None


@dataclass
class SweepGroup:
    """A sweep's header line and its points, in the grid's order."""

    sweep_id: str
    host: str
    status: str
    cost: str
    rows: list[RunRow] = field(default_factory=list)

    @property
    def created_at(self) -> float:
        return max(r.created_at for r in self.rows)


def args_of(run: RunRecord) -> dict:
    """The run's recorded plan, or {} when args_json is not readable."""
    try:
        args = run.args
    except (ValueError, RecursionError):
        return {}
    return args if isinstance(args, dict) else {}


def summary_of(run: RunRecord) -> dict:
    """summary.json as the ledger keeps it, or {} when it is not readable."""
    try:
        summary = run.summary
    except (ValueError, RecursionError):
        return {}
    return summary if isinstance(summary, dict) else {}


def when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def duration_text(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def money(amount: float | None, currency: str | None) -> str:
    return "-" if amount is None else f"{amount:.2f} {currency or ''}".strip()


def run_cost_now(run: RunRecord, config: Config, now: float) -> tuple[float | None, str, bool]:
    """(amount, currency, so far) as `gpu-run cost` bills it: from the host's price while the
    machine may bill, else what the ledger recorded at the run's end."""
    from gpu_run.money.budget import run_cost

    host = config.hosts.get(run.host)
    so_far = run.billed_from is not None and run.billed_to is None
    if host is not None and run.billed_from is not None:
        amount, _ = run_cost(host, run, now=now)
        return float(amount), run.currency or host.currency, so_far
    return run.cost_amount, run.currency or "", so_far


def run_row(run: RunRecord, config: Config, now: float) -> RunRow:
    args = args_of(run)
    nodes = [str(n) for n in args.get("nodes") or []]
    amount, currency, so_far = run_cost_now(run, config, now)
    end = run.ended_at if run.ended_at is not None else (now if run.status in ACTIVE_STATUSES else None)
    return RunRow(
        run_id=run.run_id, host=run.host, nodes=nodes, job=safe(run.model or "-")[:MAX_TEXT],
        job_kind="command" if args.get("command") is not None else "trainer", status=run.status,
        active=run.status in ACTIVE_STATUSES,
        best_acc="-" if run.best_val_acc is None else f"{run.best_val_acc * 100:.1f}%",
        duration=duration_text(end - run.created_at if end is not None else None),
        cost=money(amount, currency) + (" so far" if so_far and amount is not None else ""),
        stop_state=run.stop_status or ("-" if run.status not in ACTIVE_STATUSES else "up"),
        stop_failed=run.stop_failed, stop_detail=safe(run.stop_detail or "")[:MAX_TEXT],
        started=when(run.created_at), created_at=run.created_at, sweep_id=run.sweep_id, sweep_point=run.sweep_point,
    )


def matches(row: RunRow, host: str | None, status: str | None) -> bool:
    if host and host != row.host and host not in row.nodes:
        return False
    if status == "not-stopped":
        return row.stop_failed
    return not status or status == row.status


def runs_table(ledger: Ledger, config: Config, host: str | None = None, status: str | None = None,
               page: int = 1, per_page: int | None = RUNS_PER_PAGE, now: float | None = None) -> dict:
    """The runs page: newest first, a sweep's points grouped under it (placed by its newest point),
    `per_page` runs a page (None: all; a sweep is never split), the filters' choices, and how many
    runs the ledger holds."""
    now = now or time.time()
    runs = ledger.list_runs()
    rows = [run_row(r, config, now) for r in runs]
    sweeps: dict[str, SweepRecord] = {s.sweep_id: s for s in ledger.list_sweeps()}
    items: list[RunRow | SweepGroup] = []
    groups: dict[str, SweepGroup] = {}
    for row in rows:
        if not matches(row, host, status):
            continue
        if row.sweep_id is None:
            items.append(row)
            continue
        group = groups.get(row.sweep_id)
        if group is None:
            record = sweeps.get(row.sweep_id)
            group = groups[row.sweep_id] = SweepGroup(row.sweep_id, record.host if record else row.host,
                                                      record.status if record else "-", "")
            items.append(group)  # the list is newest first: the group stands where its newest point is
        group.rows.append(row)
    for group in groups.values():
        group.rows.sort(key=lambda r: (r.sweep_point is None, r.sweep_point or 0, r.created_at))
        group.cost = sweep_cost(group.rows)
    pages = paginate(items, per_page)
    page = min(max(page, 1), len(pages))
    hosts = sorted({r.host for r in rows} | {n for r in rows for n in r.nodes})
    statuses = sorted({r.status for r in rows})
    return {"items": pages[page - 1], "hosts": hosts, "statuses": statuses, "total": len(rows),
            "matching": sum(item_size(i) for i in items), "shown": sum(item_size(i) for i in pages[page - 1]),
            "page": page, "pages": len(pages)}


def item_size(item: RunRow | SweepGroup) -> int:
    return len(item.rows) if isinstance(item, SweepGroup) else 1


def paginate(items: list, per_page: int | None) -> list[list]:
    """Pages of about `per_page` runs each; a sweep stays whole on the page where it starts."""
    if not per_page:
        return [items]
    pages: list[list] = [[]]
    count = 0
    for item in items:
        if count >= per_page:
            pages.append([])
            count = 0
        pages[-1].append(item)
        count += item_size(item)
    return pages


def sweep_cost(rows: list[RunRow]) -> str:
    """The points' costs added up, per currency (amounts in two currencies are never added)."""
    sums: dict[str, float] = {}
    for r in rows:
        amount, _, currency = r.cost.replace(" so far", "").partition(" ")
        try:
            sums[currency] = sums.get(currency, 0.0) + float(amount)
        except ValueError:  # "-": no cost known
            continue
    return ", ".join(f"{v:.2f} {c}".strip() for c, v in sorted(sums.items())) or "-"


def not_stopped(ledger: Ledger) -> list[dict]:
    """Runs whose machine is NOT confirmed stopped and may still bill (the red banner)."""
    return [{"run_id": r.run_id, "host": r.host, "detail": safe(r.stop_detail or "no stop confirmed")[:MAX_TEXT],
             "state": r.stop_status, "active": r.status in ACTIVE_STATUSES}
            for r in ledger.list_runs() if r.stop_failed]


# One run -----------------------------------------------------------------------------------------

def read_tail(path: Path, limit: int) -> tuple[str, bool]:
    """The last `limit` bytes of a file as text, and whether anything before them was left out."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                f.seek(size - limit)
            data = f.read(limit)
    except OSError:
        return "", False
    return data.decode("utf-8", "replace"), size > limit


def log_tail(run_dir: Path) -> dict:
    """The log's last lines: control characters and escape sequences dropped, a progress bar's
    redraws (carriage returns) shown as their last state."""
    text, cut = read_tail(run_dir / "train.log", LOG_TAIL_BYTES)
    lines = text.split("\n")
    if cut:
        lines = lines[1:]  # the first line is a piece of one
    if lines and lines[-1] == "":
        lines.pop()
    shown = [safe(line.rstrip("\r").rsplit("\r", 1)[-1])[:2000] for line in lines[-LOG_TAIL_LINES:]]
    return {"lines": shown, "cut": cut or len(lines) > LOG_TAIL_LINES}


def plottable(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and abs(value) <= 1e15
    except OverflowError:
        return False


def cell(value) -> str:
    """A value from a host for a table cell: numbers as numbers, anything else as short plain text."""
    if plottable(value):
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return safe(value)[:MAX_TEXT]
    try:
        return safe(json.dumps(value))[:MAX_TEXT]
    except (ValueError, TypeError, RecursionError):
        return "?"


def logged_epochs(run_dir: Path) -> dict[int, dict]:
    """The trainer's epoch events in train.log, by epoch: while `gpu-run train` follows a run, its
    log grows on the laptop line by line, and metrics.jsonl arrives only with the pull."""
    text, _ = read_tail(run_dir / "train.log", METRICS_MAX_BYTES)
    lines = [line for line in text.splitlines() if line.startswith('{"event": "epoch"')]
    records, _ = read_metrics_lenient("\n".join(lines))
    return {r["epoch"]: {k: v for k, v in r.items() if k not in ("event", "time", "epochs")} for r in records}


def curves(run_dir: Path) -> dict:
    """The epochs as the charts take them: metrics.jsonl's, and before it arrives the log's epoch
    events; each chart's series (None where an epoch lacks a value), and the last epoch's every
    key and value as text for the table."""
    text, _ = read_tail(run_dir / "metrics.jsonl", METRICS_MAX_BYTES)
    written, skipped = read_metrics_lenient(text)
    by_epoch = logged_epochs(run_dir)
    by_epoch.update({r["epoch"]: r for r in written})  # the file is the record; the log fills in what it lacks
    records = [by_epoch[e] for e in sorted(by_epoch)]
    epochs = [r["epoch"] for r in records]
    charts = {}
    for chart, keys in CHART_KEYS.items():
        series = {}
        for key in keys:
            values = [r.get(key) if plottable(r.get(key)) else None for r in records]
            if any(v is not None for v in values):
                series[key] = values
        charts[chart] = series
    last = [[safe(str(k))[:MAX_NAME], cell(v)] for k, v in list(records[-1].items())[:60]] if records else []
    return {"epochs": epochs, "charts": charts, "last": last, "skipped": skipped}


def run_cost_detail(run: RunRecord, config: Config, now: float) -> dict:
    """Cost so far (or in all) with its billed seconds, and the run's --budget (None: no budget)."""
    from gpu_run.money.budget import run_cost

    args = args_of(run)
    amount, currency, so_far = run_cost_now(run, config, now)
    billed_s = None
    host = config.hosts.get(run.host)
    if args.get("nodes"):
        from gpu_run.multinode.nodes import nodes_cost, records_of

        records = records_of(run)
        if records and all(r.host in config.hosts for r in records):
            total, billed_s = nodes_cost(config.hosts, records, now=now)
            amount = float(total)
    elif host is not None and run.billed_from is not None:
        _, billed_s = run_cost(host, run, now=now)
    spec = args.get("spec") if isinstance(args.get("spec"), dict) else {}
    budget = spec.get("budget")
    budget = float(budget) if plottable(budget) and budget > 0 else None
    return {"amount": amount, "currency": currency, "billed_s": billed_s, "so_far": so_far, "budget": budget,
            "text": money(amount, currency) + (" so far" if so_far and amount is not None else "")}


def phases_of(ledger: Ledger, run_id: str) -> list[dict]:
    return [{"phase": safe(p.phase), "status": safe(p.status), "started_at": p.started_at, "ended_at": p.ended_at,
             "duration": duration_text(p.duration_s), "detail": safe(p.detail or "")[:MAX_TEXT]}
            for p in ledger.phases(run_id)]


def run_live(ledger: Ledger, config: Config, run_id: str, now: float | None = None) -> dict:
    """What the run's page polls for: state, curves, log tail, phases, cost."""
    now = now or time.time()
    run = ledger.get_run(run_id)
    run_dir = Path(run.run_dir or "")
    row = run_row(run, config, now)
    return {
        "run_id": run.run_id, "status": run.status, "active": row.active, "now": now, "duration": row.duration,
        "best_acc": row.best_acc, "stop": {"failed": run.stop_failed, "state": row.stop_state, "detail": row.stop_detail},
        "metrics": curves(run_dir) if run.run_dir else {"epochs": [], "charts": {}, "last": [], "skipped": 0},
        "log": log_tail(run_dir) if run.run_dir else {"lines": [], "cut": False},
        "phases": phases_of(ledger, run.run_id), "cost": run_cost_detail(run, config, now),
    }


def nodes_of(run: RunRecord) -> list[dict]:
    """A multi-node run's nodes (host, its run id there, rank 0, how its machine ended)."""
    if not args_of(run).get("nodes"):
        return []
    from gpu_run.multinode.nodes import records_of

    return [{"index": n.index, "host": n.host, "run_id": n.run_id, "rank0": n.rank0, "exit_code": n.exit_code,
             "stop": n.stop_state or "-", "detail": safe(n.stop_detail or "")[:MAX_TEXT]} for n in records_of(run)]


def run_page(ledger: Ledger, config: Config, run_id: str) -> dict:
    """The run's page as it loads: its row, plan, nodes, figures and files; the live part is polled."""
    run = ledger.get_run(run_id)
    row = run_row(run, config, time.time())
    run_dir = Path(run.run_dir) if run.run_dir else None
    files = list_files(run_dir) if run_dir else {"files": [], "cut": False}
    summary = summary_of(run)
    return {
        "row": row, "run_dir": run.run_dir or "-", "data_path": run.data_path or "-",
        "error": safe(str(summary.get("error") or ""))[:MAX_TEXT],
        "nodes": nodes_of(run), "files": files,
        "figures": [f for f in files["files"] if f["path"].startswith("report/") and f["path"].lower().endswith(FIGURE_SUFFIXES)],
        "can_report": bool(run_dir and (run_dir / "metrics.jsonl").is_file() and (run_dir / "predictions.csv").is_file()),
        "has_report": bool(run_dir and (run_dir / "report" / "report.md").is_file()),
    }


# A run's files -----------------------------------------------------------------------------------

def list_files(run_dir: Path) -> dict:
    """The regular files in the run's folder, by path relative to it; symlinks are not followed
    nor listed (one could lead out of the folder), at most MAX_LISTED_FILES."""
    found: list[dict] = []
    cut = False
    for top, dirs, names in os.walk(run_dir, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(top) / name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if len(found) >= MAX_LISTED_FILES:
                cut = True
                break
            found.append({"path": path.relative_to(run_dir).as_posix(), "size": size_text(st.st_size)})
        if cut:
            break
    return {"files": found, "cut": cut}


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def file_in_run(run_dir: str | None, relative: str) -> Path | None:
    """The regular file `relative` names inside the run's folder, or None: an absolute path, a
    `..`, a symlink whose target is outside the folder, a folder, a device, nothing at all."""
    if not run_dir or not relative or "\x00" in relative:
        return None
    parts = relative.replace("\\", "/").split("/")
    if relative.startswith("/") or ".." in parts:
        return None
    try:
        top = os.path.realpath(run_dir)
        target = os.path.realpath(os.path.join(top, relative))  # symlinks resolved, then checked
        if os.path.commonpath([top, target]) != top or target == top:
            return None
        return Path(target) if stat.S_ISREG(os.stat(target).st_mode) else None
    except (OSError, ValueError):
        return None


# Costs and compare -------------------------------------------------------------------------------

def costs(ledger: Ledger, config: Config) -> dict:
    """`gpu-run cost`'s rows and its totals per host and per month."""
    from gpu_run.money.report import cost_rows, totals

    rows = cost_rows(ledger, config)
    return {"rows": rows, "per_host": totals(rows, "host"), "per_month": totals(rows, "month"),
            "cloud": any(r["cloud"] for r in rows)}


def compare(ledger: Ledger, run_ids: list[str]) -> dict:
    """`gpu-run compare`'s rows for the runs picked; a run that cannot be compared is named with why."""
    from gpu_run.deliverables.compare import run_row as compare_row
    from gpu_run.errors import GpuRunError

    rows, problems = [], []
    for run_id in run_ids:
        try:
            run = ledger.get_run(run_id)
            row = compare_row(run.run_id, Path(run.run_dir or ""))
        except GpuRunError as e:
            problems.append(safe(str(e))[:MAX_TEXT])
            continue
        model = row["model"] if row["model"] != "?" else (run.model or "?")  # no summary.json yet: the ledger's
        rows.append({**row, "model": safe(str(model))[:MAX_TEXT],
                     "params": f"{row['parameters'] / 1e6:.2f} M" if row.get("parameters") else "?",
                     "acc": f"{row['best_val_acc'] * 100:.2f}%", "speed": f"{row['train_images_per_s']:.1f}",
                     "epoch": f"{row['epoch_time_s']:.1f}", "cost_text": money(row["cost"], row["currency"]),
                     "plan_epoch": planned_text(row.get("estimated_epoch_s"), row.get("actual_epoch_s")),
                     "plan_total": planned_text(row.get("estimated_total_s"), row.get("actual_total_s"))})
    return {"rows": rows, "problems": problems}


def planned_text(planned: float | None, actual: float | None) -> str:
    return " / ".join("-" if v is None else f"{v:.1f}" for v in (planned, actual))


def compare_choices(ledger: Ledger, config: Config, limit: int = 200) -> list[RunRow]:
    """Recent runs that have metrics to compare, for the compare page's picker."""
    now = time.time()
    return [run_row(r, config, now) for r in ledger.list_runs(limit=limit)
            if r.run_dir and (Path(r.run_dir) / "metrics.jsonl").is_file()]
