"""`gpu-run compare RUN RUN...`: models side by side (accuracy, speed, size, cost), table and figure."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from gpu_run.errors import GpuRunError
from gpu_run.events import parse_event, read_metrics
from gpu_run.deliverables.figures import new_figure, save

COLUMNS = ["run", "model", "parameters", "best_val_acc", "train_images_per_s", "epoch_time_s", "cost", "currency",
           "estimated_epoch_s", "actual_epoch_s", "estimated_total_s", "actual_total_s"]


def run_row(run_id: str, run_dir: Path) -> dict:
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise GpuRunError(f"run {run_id} has no metrics.jsonl in {run_dir}; `gpu-run pull {run_id}` first")
    metrics = read_metrics(metrics_path.read_text())
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    parameters = None
    log = run_dir / "train.log"
    if log.is_file():
        for line in log.read_text().splitlines():
            event = parse_event(line)
            if event and event["event"] == "start":
                parameters = event.get("parameters")
                break
    n = max(1, len(metrics))
    return {
        "run": run_id,
        "model": summary.get("model", "?"),
        "parameters": parameters,
        "best_val_acc": max((m["val_acc"] for m in metrics), default=0.0),
        "train_images_per_s": sum(m["train_images_per_s"] for m in metrics) / n,
        "epoch_time_s": sum(m["epoch_time_s"] for m in metrics) / n,
        "cost": summary.get("cost", {}).get("amount", 0.0),
        "currency": summary.get("cost", {}).get("currency", ""),
        **plan_against_run(run_id),
    }


def plan_against_run(run_id: str) -> dict:
    """What `gpu-run plan` estimated for the run (per epoch with evaluation, and in all) beside what
    it took; None where there was no plan, or the ledger does not know the run."""
    from gpu_run.ledger import Ledger
    from gpu_run.paths import ledger_path
    from gpu_run.plan.gather import estimate_against_actual

    try:
        return estimate_against_actual(Ledger(ledger_path()), run_id)
    except GpuRunError:
        return dict.fromkeys(COLUMNS[-4:])


def write_comparison(rows: list[dict], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| run | model | parameters | best val acc | train images/s | s/epoch | cost | epoch s, planned / actual "
             "| total s, planned / actual |", "|---|---|---|---|---|---|---|---|---|"]

    def against(planned, actual) -> str:
        return " / ".join("-" if v is None else f"{v:.1f}" for v in (planned, actual))

    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] else "?"
        lines.append(f"| {r['run']} | {r['model']} | {params} | {r['best_val_acc'] * 100:.2f}% | "
                     f"{r['train_images_per_s']:.1f} | {r['epoch_time_s']:.1f} | {r['cost']:.2f} {r['currency']} | "
                     f"{against(r.get('estimated_epoch_s'), r.get('actual_epoch_s'))} | "
                     f"{against(r.get('estimated_total_s'), r.get('actual_total_s'))} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")

    fig, ax = new_figure(figsize=(5, 3.6))
    for r in rows:
        ax.scatter(r["train_images_per_s"], r["best_val_acc"] * 100, s=60)
        ax.annotate(f"{r['model']}\n{r['run']}", (r["train_images_per_s"], r["best_val_acc"] * 100),
                    textcoords="offset points", xytext=(6, 4), fontsize=6)
    ax.set(xlabel="training speed (images/s)", ylabel="best validation accuracy (%)", title="Accuracy vs speed")
    ax.grid(alpha=0.3)
    save(fig, out / "accuracy_vs_speed.png")
    return {"csv": out / "compare.csv", "markdown": out / "compare.md", "figure": out / "accuracy_vs_speed.png"}
