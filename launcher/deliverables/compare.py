"""`gpu-run compare RUN RUN...`: models side by side (accuracy, speed, size, cost), table and figure."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from rich.table import Table
from rich.text import Text

from gpu_run.deliverables.figures import new_figure, save
from gpu_run.deliverables.host_files import read_host_metrics, read_summary
from gpu_run.errors import GpuRunError
from gpu_run.events import MAX_METRIC, parse_event
from gpu_run.host_text import safe
from gpu_run.ui import listing

COLUMNS = [
    "run",
    "model",
    "parameters",
    "best_val_acc",
    "train_images_per_s",
    "epoch_time_s",
    "cost",
    "currency",
    "estimated_epoch_s",
    "actual_epoch_s",
    "estimated_total_s",
    "actual_total_s",
]
# What a run's row reads from each epoch of metrics.jsonl.
METRIC_NUMBERS = ("val_acc", "train_images_per_s", "epoch_time_s")


def run_row(run_id: str, run_dir: Path) -> dict:
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise GpuRunError(f"run {run_id} has no metrics.jsonl in {run_dir}; `gpu-run pull {run_id}` first")
    metrics = read_host_metrics(metrics_path, METRIC_NUMBERS)
    summary = read_summary(run_dir)
    cost = summary.get("cost") if isinstance(summary.get("cost"), dict) else {}
    n = max(1, len(metrics))
    return {
        "run": run_id,
        "model": summary.get("model", "?"),
        "parameters": parameter_count(run_dir / "train.log"),
        "best_val_acc": max((m["val_acc"] for m in metrics), default=0.0),
        "train_images_per_s": sum(m["train_images_per_s"] for m in metrics) / n,
        "epoch_time_s": sum(m["epoch_time_s"] for m in metrics) / n,
        "cost": cost.get("amount", 0.0),
        "currency": cost.get("currency", ""),
        **plan_against_run(run_id),
    }


def parameter_count(log: Path) -> int | None:
    """The model's size from the trainer's start event in train.log (the host's output), or None
    when that says no whole number."""
    if not log.is_file():
        return None
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = parse_event(line)
        except RecursionError:  # a host's "{" followed by deep nesting
            continue
        if event and event["event"] == "start":
            count = event.get("parameters")
            valid = isinstance(count, int) and not isinstance(count, bool) and 0 < count <= MAX_METRIC
            return count if valid else None
    return None


def plan_against_run(run_id: str) -> dict:
    """What `gpu-run plan` estimated for the run (per epoch with evaluation, and in all) beside what
    it took; None where there was no plan, or the ledger does not know the run."""
    from gpu_run.ledger import Ledger
    from gpu_run.paths import ledger_path
    from gpu_run.plan.gather import estimate_against_actual

    try:
        planned = estimate_against_actual(Ledger(ledger_path()), run_id)
    except (GpuRunError, ValueError, KeyError, TypeError, RecursionError, OverflowError):
        # The actual side reads metrics.jsonl and train.log as the host wrote them; where they are
        # broken the comparison goes on without this (run_row has said which lines it skipped).
        return dict.fromkeys(COLUMNS[-4:])
    return {k: v if isinstance(v, (int, float)) and math.isfinite(v) else None for k, v in planned.items()}


def comparison_table(rows: list[dict]) -> Table:
    """The rows for the terminal. Every cell is Text, so a model named "[bold red]" shows as
    written, never as markup, and no control character from a host reaches the terminal."""
    table = listing("run", "model")
    for column in ("params", "val acc", "img/s", "s/epoch", "cost"):
        table.add_column(column, justify="right", overflow="fold")
    for r in rows:
        cells = [
            r["run"],
            r["model"],
            f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] else "?",
            f"{r['best_val_acc'] * 100:.2f}%",
            f"{r['train_images_per_s']:.1f}",
            f"{r['epoch_time_s']:.1f}",
            f"{r['cost']:.2f} {r['currency']}",
        ]
        table.add_row(*(Text(safe("" if c is None else str(c))) for c in cells))
    return table


def write_comparison(rows: list[dict], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| run | model | parameters | best val acc | train images/s | s/epoch | cost | epoch s, planned / actual "
        "| total s, planned / actual |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def against(planned, actual) -> str:
        return " / ".join("-" if v is None else f"{v:.1f}" for v in (planned, actual))

    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] else "?"
        lines.append(
            f"| {r['run']} | {r['model']} | {params} | {r['best_val_acc'] * 100:.2f}% | "
            f"{r['train_images_per_s']:.1f} | {r['epoch_time_s']:.1f} | {r['cost']:.2f} {r['currency']} | "
            f"{against(r.get('estimated_epoch_s'), r.get('actual_epoch_s'))} | "
            f"{against(r.get('estimated_total_s'), r.get('actual_total_s'))} |"
        )
    (out / "compare.md").write_text("\n".join(lines) + "\n")

    fig, ax = new_figure(figsize=(5, 3.6))
    for r in rows:
        ax.scatter(r["train_images_per_s"], r["best_val_acc"] * 100, s=60)
        ax.annotate(
            f"{r['model']}\n{r['run']}",
            (r["train_images_per_s"], r["best_val_acc"] * 100),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=6,
            parse_math=False,
        )
    ax.set(xlabel="training speed (images/s)", ylabel="best validation accuracy (%)", title="Accuracy vs speed")
    ax.grid(alpha=0.3)
    save(fig, out / "accuracy_vs_speed.png")
    return {"csv": out / "compare.csv", "markdown": out / "compare.md", "figure": out / "accuracy_vs_speed.png"}
