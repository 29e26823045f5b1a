"""`gpu-run plan` on a terminal: one table that fits 80 columns, a source tag on every figure, and
a note per host that says where each figure came from; or the rows as JSON."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gpu_run.money.cost import format_money
from gpu_run.plan.estimate import (
    ASSUMED,
    CONFIG,
    DOCTOR,
    MEASURED_HERE,
    PAST_RUN,
    PUBLISHED,
    Figure,
    Job,
    Row,
    megabytes,
)
from gpu_run.plan.tables import AWS_SOURCE

# One letter per source, after each figure in the table; the legend under it spells them out.
TAGS = {
    PUBLISHED: "P",
    MEASURED_HERE: "M",
    PAST_RUN: "R",
    CONFIG: "C",
    AWS_SOURCE: "C",
    DOCTOR: "D",
    ASSUMED: "A",
    "--uplink": "U",
    "you said": "U",
}
LEGEND = (
    ("P", "published"),
    ("M", "measured here"),
    ("R", "your past runs"),
    ("C", "gpu-run.toml"),
    ("D", "doctor"),
    ("U", "you said"),
    ("A", "assumed"),
    ("?", "other"),
)
LIMITS = {"gpu": "GPU", "cpu_decode": "CPU decode", "upload": "upload", "cpu": "CPU"}


def duration(seconds: float) -> str:
    """45s, 12m05s, 3h20m, 2d04h: two units at most, so a column stays narrow."""
    s = int(round(seconds))
    if seconds < 0.5:
        return "<1s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def tag(figure: Figure | None) -> str:
    return TAGS.get(figure.source, "?") if figure is not None else ""


def _tagged(text: str, figure: Figure | None) -> Text:
    out = Text(text)
    if figure is not None:
        out.append(" " + tag(figure), style="dim")
    return out


def verdict(row: Row) -> Text:
    if row.unknown is not None:
        return Text("unknown", style="yellow")
    if row.recommended:
        return Text("BEST", style="bold green")
    misses = [w for w, bad in (("late", row.late), ("over budget", row.over_budget)) if bad]
    return Text(", ".join(misses), style="red") if misses else Text("ok")


def plan_table(rows: list[Row]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    # The host identifies the row: never wrapped or cut.
    table.add_column("host", no_wrap=True)
    table.add_column("gpu", overflow="fold")
    table.add_column("epoch", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("cost", justify="right", no_wrap=True)
    table.add_column("limit", no_wrap=True)
    table.add_column("", overflow="fold")
    for r in rows:
        gpu = Text(r.gpu.value or ("CPU" if r.gpu.source != ASSUMED else "?"))
        if r.unknown is not None:
            table.add_row(Text(r.host), gpu, "-", "-", "-", "-", verdict(r))
            continue
        cost = Text(format_money(r.cost, r.currency))
        table.add_row(
            Text(r.host),
            gpu,
            _tagged(duration(r.epoch_s.value), r.epoch_s),
            _tagged(duration(r.total_s.value), r.total_s),
            cost,
            Text(LIMITS.get(r.limit, r.limit or "-")),
            verdict(r),
        )
    return table


def _source(figure: Figure) -> str:
    return f"{figure.source}: {figure.detail}" if figure.detail else figure.source


def host_notes(row: Row) -> str:
    """Where this row's figures came from, in sentences."""
    if row.unknown is not None:
        return f"{row.host}: {row.unknown}."
    gpu = row.gpu.value or "no GPU"
    notes = [f"{row.host}: {gpu} ({_source(row.gpu)})."]
    if row.gpu_rate is not None:
        notes.append(f"GPU {row.gpu_rate.value:,.0f} img/s ({_source(row.gpu_rate)}).")
    if row.data_rate is not None:
        notes.append(f"Data path {row.data_rate.value:,.0f} img/s ({row.data_rate.detail}).")
    if row.train_rate.source == PAST_RUN or row.gpu_rate is None:
        notes.append(f"Trains at {row.train_rate.value:,.1f} img/s ({_source(row.train_rate)}).")
    if row.limit == "cpu_decode":
        notes.append("The host's CPUs cannot decode the images as fast as the GPU trains.")
    elif row.limit == "upload":
        notes.append("The upload takes longer than the training.")
    notes += [f"{note}." for note in row.notes]
    if row.fix:
        notes.append(
            f"--cache-size {row.fix['cache_size']} (a copy resized once on this machine, smaller to send "
            f"and to decode) would save {duration(row.fix['saves_s'])} and "
            f"{format_money(row.fix['saves'], row.currency)} (total {duration(row.fix['total_s'])})."
        )
    notes.append("Total: " + ", ".join(f"{name} {duration(p.value)} {tag(p)}" for name, p in row.parts.items()) + ".")
    upload = row.parts["upload"]
    if upload.detail:
        notes.append(f"Upload: {upload.detail}.")
    return " ".join(notes)


def legend(rows: list[Row]) -> str:
    """The source letters the table uses, spelled out."""
    used = set()
    for r in rows:
        for f in (r.epoch_s, r.total_s, *r.parts.values()):
            if f is not None:
                used.add(tag(f))
    return "  ".join(f"{letter} {word}" for letter, word in LEGEND if letter in used)


def print_plan(
    rows: list[Row], job: Job, deadline_s: float | None, budget: float | None, console: Console | None = None
) -> None:
    console = console or Console(highlight=False)
    wants = [
        f"{job.epochs} epochs of {job.model} at {job.image_size} px on {job.train_images:,} train + "
        f"{job.val_images:,} val images ({megabytes(job.dataset_bytes)})"
    ]
    if deadline_s is not None:
        wants.append(f"deadline {duration(deadline_s)}")
    if budget is not None:
        wants.append(f"budget {budget:g} (each host's currency)")
    console.print(", ".join(wants), markup=False)
    console.print(plan_table(rows))
    console.print(f"Sources: {legend(rows)}", style="dim", markup=False)
    best = [r for r in rows if r.recommended]
    if len(best) == 1:
        b = best[0]
        console.print(
            Text.assemble(
                "Recommended: ",
                (b.host, "bold green"),
                f", {duration(b.total_s.value)} for {format_money(b.cost, b.currency)}",
                (f" (with --cache-size {b.fix['cache_size']}: {duration(b.fix['total_s'])})" if b.fix else ""),
            )
        )
    elif best:
        console.print(
            "Cheapest in each currency (amounts in different currencies are not compared): "
            + ", ".join(f"{b.host} {format_money(b.cost, b.currency)}" for b in best),
            markup=False,
        )
    else:
        console.print(
            Text(
                "No host meets the deadline and the budget: raise them, lower --epochs or "
                "--image-size, or use a faster host.",
                style="red",
            )
        )
    console.print("")
    for r in rows:
        console.print(host_notes(r), markup=False)
