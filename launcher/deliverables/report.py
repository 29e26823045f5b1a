"""`gpu-run report RUN`: the thesis figures, drawn on the laptop from the pulled outputs.

Everything comes from metrics.jsonl, predictions.csv, summary.json and the dataset (for the
misclassified-image grid), so the trainer image stays lean. Figures are PNG at 300 dpi; class
names in CJK render when a CJK font is installed (figures.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageOps

from gpu_run.deliverables.figures import new_figure, save
from gpu_run.deliverables.host_files import (
    Prediction,
    dataset_file,
    read_host_metrics,
    read_host_predictions,
    read_summary,
    summary_classes,
    warn,
)
from gpu_run.errors import GpuRunError

# What the curves and report.md read from each epoch of metrics.jsonl.
METRIC_NUMBERS = ("train_acc", "val_acc", "train_loss", "val_loss", "epoch_time_s", "train_images_per_s")


def confusion(preds: list[Prediction], classes: list[str]) -> list[list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for p in preds:
        matrix[index[p.true]][index[p.predicted]] += 1
    return matrix


def per_class_scores(matrix: list[list[int]], classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class (pure arithmetic on the confusion matrix)."""
    rows = []
    for i, name in enumerate(classes):
        tp = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(len(classes)))
        support = sum(matrix[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows


def plot_curves(metrics: list[dict], out: Path) -> Path:
    epochs = [m["epoch"] for m in metrics]
    fig, (acc, loss) = new_figure(1, 2, figsize=(8, 3.2))
    acc.plot(epochs, [m["train_acc"] * 100 for m in metrics], "o-", label="train")
    acc.plot(epochs, [m["val_acc"] * 100 for m in metrics], "s-", label="validation")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    loss.plot(epochs, [m["val_loss"] for m in metrics], "s-", label="validation")
    loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    return save(fig, out / "curves.png")


def plot_confusion(matrix: list[list[int]], classes: list[str], out: Path) -> Path:
    n = len(classes)
    size = max(3.2, 0.55 * n + 1.8)
    fig, axes = new_figure(1, 2, figsize=(2 * size + 0.8, size))
    normalised = [[v / max(1, sum(row)) for v in row] for row in matrix]
    for ax, data, title, fmt in (
        (axes[0], matrix, "Confusion matrix (counts)", "{:d}"),
        (axes[1], normalised, "Normalised by true class", "{:.2f}"),
    ):
        top = max(max(r) for r in data) or 1
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=top)
        ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
        # Class names are shown as written: a "$" would start matplotlib's math (and can fail it).
        ax.set_xticklabels(classes, rotation=45, ha="right", parse_math=False)
        ax.set_yticklabels(classes, parse_math=False)
        for r in range(n):
            for c in range(n):
                ax.text(
                    c,
                    r,
                    fmt.format(data[r][c]),
                    ha="center",
                    va="center",
                    color="white" if data[r][c] > top / 2 else "black",
                    fontsize=8,
                )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save(fig, out / "confusion_matrix.png")


def plot_per_class(rows: list[dict], out: Path) -> Path:
    fig, ax = new_figure(figsize=(6, 0.4 * len(rows) + 1.0))
    ax.axis("off")
    cells = [
        [r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"])] for r in rows
    ]
    table = ax.table(cellText=cells, colLabels=["class", "precision", "recall", "F1", "support"], loc="center")
    table.scale(1, 1.4)
    for cell in table.get_celld().values():
        cell.get_text().set_parse_math(False)
    ax.set_title("Per-class precision, recall and F1 (validation)")
    return save(fig, out / "per_class.png")


def plot_misclassified(preds: list[Prediction], data_root: Path | None, out: Path, limit: int = 16) -> Path | None:
    wrong = sorted((p for p in preds if p.true != p.predicted), key=lambda p: -p.confidence)[:limit]
    if not wrong or data_root is None:
        return None
    cols = min(4, len(wrong))
    rows = -(-len(wrong) // cols)
    fig, axes = new_figure(rows, cols, figsize=(2.2 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    outside = 0
    for ax, p in zip(axes.flat, wrong):
        # The path came from the host: only a file of the dataset itself is opened, never one it
        # names elsewhere on the laptop (a key, /dev/tty, ../../x.jpg).
        image = dataset_file(data_root, p.path)
        if image is None:
            outside += 1
            ax.text(0.5, 0.5, "not a file of the dataset", ha="center", va="center")
        else:
            try:
                with Image.open(image) as im:
                    # Shown as the model saw it: the trainer applies the photo's EXIF orientation too.
                    ax.imshow(ImageOps.exif_transpose(im).convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError):
                ax.text(0.5, 0.5, "image not readable", ha="center", va="center")
        ax.set_title(f"true: {p.true}\npred: {p.predicted} ({p.confidence:.0%})", fontsize=8, parse_math=False)
    if outside:
        warn(
            f"{outside} of the {len(wrong)} most confident mistakes are drawn without their image: predictions.csv "
            f"names paths that are not files inside the dataset folder {data_root}"
        )
    fig.suptitle("Most confident mistakes (validation)")
    return save(fig, out / "misclassified.png")


def write_report(run_dir: Path, data_root: Path | None = None) -> Path:
    """Draw every figure into run_dir/report/ and write report.md; returns the report folder."""
    metrics_path, preds_path = run_dir / "metrics.jsonl", run_dir / "predictions.csv"
    if not metrics_path.is_file() or not preds_path.is_file():
        raise GpuRunError(f"{run_dir} has no metrics.jsonl / predictions.csv yet; `gpu-run pull` the run first")
    summary = read_summary(run_dir)
    metrics = read_host_metrics(metrics_path, METRIC_NUMBERS)
    preds = read_host_predictions(preds_path, summary_classes(summary))
    classes = summary_classes(summary) or sorted({p.true for p in preds} | {p.predicted for p in preds})
    dataset = summary.get("dataset") if isinstance(summary.get("dataset"), dict) else {}
    if data_root is None and isinstance(dataset.get("path"), str):
        data_root = Path(dataset["path"])  # the laptop recorded it when the run started
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    matrix = confusion(preds, classes)
    scores = per_class_scores(matrix, classes)
    figures = [plot_curves(metrics, out), plot_confusion(matrix, classes, out), plot_per_class(scores, out)]
    mistakes = plot_misclassified(preds, data_root if data_root and data_root.is_dir() else None, out)
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        w.writerows(scores)
    (out / "report.md").write_text(report_markdown(summary, metrics, scores, figures, mistakes, preds))
    return out


def report_markdown(
    summary: dict,
    metrics: list[dict],
    scores: list[dict],
    figures: list[Path],
    mistakes: Path | None,
    preds: list[Prediction],
) -> str:
    best = max(metrics, key=lambda m: m["val_acc"]) if metrics else {}
    cost = summary.get("cost", {})
    epoch_s = sum(m["epoch_time_s"] for m in metrics) / len(metrics) if metrics else 0
    lines = [
        f"# Run {summary.get('run_id', '?')}",
        "",
        "| setting | value |",
        "|---|---|",
        f"| model | {summary.get('model', '?')} |",
        f"| classes | {', '.join(summary.get('classes', []))} |",
        f"| epochs | {summary.get('epochs_completed', len(metrics))} of {summary.get('epochs', '?')} |",
        f"| dataset | {summary.get('dataset', {}).get('train_images', '?')} train / {len(preds)} validation images |",
        f"| host | {summary.get('host', '?')} ({summary.get('device', '?')}) |",
        f"| best validation accuracy | {best.get('val_acc', 0) * 100:.2f}% (epoch {best.get('epoch', '?')}) |",
        f"| training speed | {sum(m['train_images_per_s'] for m in metrics) / max(1, len(metrics)):.1f} images/s, "
        f"{epoch_s:.1f} s per epoch |",
        f"| duration | {summary.get('duration_s', 0):.0f} s |",
        f"| cost | {cost.get('amount', 0):.2f} {cost.get('currency', '')} ({cost.get('billed_s', 0)} s billed) |",
        "",
        "## Accuracy and loss",
        "",
        f"![Accuracy and loss curves]({figures[0].name})",
        "",
        "## Confusion matrix",
        "",
        f"![Confusion matrix]({figures[1].name})",
        "",
        "## Per-class scores",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        *[
            f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
            for r in scores
        ],
        "",
        f"![Per-class scores]({figures[2].name})",
        "",
    ]
    if mistakes:
        lines += ["## Most confident mistakes", "", f"![Misclassified validation images]({mistakes.name})", ""]
    return "\n".join(lines)
