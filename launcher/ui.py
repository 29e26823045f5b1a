"""What the user sees: one-line messages, spinners, progress bars and the live training display."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from gpu_run.events import parse_event
from gpu_run.host_text import safe


class _NullStatus:
    def update(self, *_args, **_kwargs) -> None:
        pass


class _PlainStatus:
    """A spinner whose updates (build log lines, host names) are shown as text, never as markup."""

    def __init__(self, status):
        self._status = status

    def update(self, message: str) -> None:
        self._status.update(escape(message))


def listing(*key_columns: str, title: str | None = None) -> Table:
    """A table for listings that fits an 80-column terminal: no vertical rules, and the columns
    that identify a row (run ids, models, statuses) never wrap or shorten; the others wrap."""
    table = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True, title=title
    )
    for name in key_columns:
        table.add_column(name, no_wrap=True)
    return table


def wide(console: Console) -> bool:
    """Room for the columns that only help (a start time the run id already encodes)."""
    return console.width >= 110


class UI:
    """All terminal output goes through here; quiet (for --json) keeps stdout clean for the result."""

    def __init__(self, quiet: bool = False, console: Console | None = None, verbose: bool = False):
        self.quiet = quiet
        self.verbose = verbose  # --verbose: each step's time, so a slow one is visible
        self.console = console or Console(stderr=quiet, highlight=False)

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Time a step of the command; with --verbose its seconds are printed (on stderr) as it ends."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.verbose:
                Console(stderr=True, highlight=False).print(
                    f"[dim]time {time.perf_counter() - start:7.3f} s  {escape(step)}[/dim]", soft_wrap=True
                )

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        if not self.quiet:
            # The message holds user text (host names, paths, `[hosts.NAME]`), never markup.
            self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)

    def error(self, message: str) -> None:
        Console(stderr=True, highlight=False).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)

    @contextmanager
    def spinner(self, message: str) -> Iterator:
        if self.quiet:
            yield _NullStatus()
            return
        with self.console.status(escape(message)) as status:
            yield _PlainStatus(status)

    @contextmanager
    def progress(self, description: str, total: int, unit: str = "files") -> Iterator[Callable[..., None]]:
        """A bar; the yielded function sets (completed, total) or advances by `advance`."""
        if self.quiet:
            yield lambda *a, **k: None
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        if unit == "bytes":
            columns = [
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
            ]
        columns.append(TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(escape(description), total=total)

            def update(completed: int | None = None, total: int | None = None, advance: int = 0) -> None:
                kwargs: dict[str, Any] = {}
                if completed is not None:
                    kwargs["completed"] = completed
                if total is not None:
                    kwargs["total"] = total
                if advance:
                    kwargs["advance"] = advance
                progress.update(task, **kwargs)

            yield update


class TrainingDisplay:
    """Turns the trainer's event lines into a live bar plus one printed line per epoch; a user's
    command gets one live line (its progress bar's latest redraw, the time, the cost) above the
    lines it prints. Everything shown came from the host and goes through host_text.safe.

    `cost_so_far` is called at each update so the bar shows what the run has cost until now.
    """

    def __init__(self, ui: UI, cost_so_far: Callable[[], str] | None = None, command: str | None = None):
        self.ui = ui
        self.cost_so_far = cost_so_far or (lambda: "")
        self.command = command
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.steps_per_epoch = 0
        self.epochs = 0

    def __enter__(self) -> TrainingDisplay:
        if not self.ui.quiet and self.command is not None:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[cost]}"),
                console=self.ui.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(escape(safe(self.command))[:120], total=None, cost=self.cost_so_far())
        elif not self.ui.quiet:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("step {task.fields[step]}"),
                TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]} img/s"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[cost]}"),
                console=self.ui.console,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def _print(self, message: str, style: str = "") -> None:
        if self.progress:
            self.progress.console.print(safe(message), style=style, markup=False, highlight=False, soft_wrap=True)

    def feed(self, line: str) -> dict | None:
        if line.endswith("\r"):  # a progress bar redrawing itself: the one live line, not a new one
            if self.command is not None and self.progress and self.task is not None and line.strip():
                self.progress.update(self.task, description=escape(safe(line).strip())[:160], cost=self.cost_so_far())
            return None
        event = parse_event(line)
        if event is None:
            if line.strip():
                self._print(safe(line.rstrip()), style="dim")
            return None
        handler = getattr(self, f"_on_{event['event']}", None)
        if handler:
            try:
                handler(event)
            except (KeyError, TypeError, ValueError, AttributeError):
                # A line shaped like an event but not one of ours (a user's script, a host's
                # forgery): shown as the text it is, never a crash of the display.
                self._print(safe(line.rstrip()), style="dim")
                return None
        return event

    def _on_start(self, e: dict) -> None:
        if self.command is not None:
            return  # a user's command has no trainer start to show
        self.steps_per_epoch, self.epochs = e["steps_per_epoch"], e["epochs"]
        self._print(
            f"training {e['model']} on {e['device_name']} ({e['device']}, amp {e['amp']}): "
            f"{e['train_images']} train / {e['val_images']} val images, {len(e['classes'])} classes, "
            f"epochs {e['start_epoch']}..{e['epochs']}"
        )
        if self.progress and self.task is None:
            total = max(1, self.epochs * self.steps_per_epoch)
            done = (e["start_epoch"] - 1) * self.steps_per_epoch
            self.task = self.progress.add_task(
                "train",
                total=total,
                completed=done,
                epoch=f"{e['start_epoch']}/{self.epochs}",
                step="-",
                loss="-",
                acc="-",
                speed="-",
                cost=self.cost_so_far(),
            )

    def _update(self, **fields) -> None:
        if self.progress and self.task is not None:
            self.progress.update(self.task, cost=self.cost_so_far(), **fields)

    def _on_step(self, e: dict) -> None:
        self._update(
            completed=(e["epoch"] - 1) * e["steps"] + e["step"],
            epoch=f"{e['epoch']}/{self.epochs}",
            step=f"{e['step']}/{e['steps']}",
            loss=f"{e['loss']:.4f}",
            acc=f"{e['acc'] * 100:.1f}%",
            speed=f"{e['images_per_s']:.0f}",
        )

    def _on_epoch(self, e: dict) -> None:
        star = "  * best" if e.get("best") else ""
        mem = f"  gpu mem {e['gpu_mem_peak_mb']:.0f} MiB" if "gpu_mem_peak_mb" in e else ""
        self._print(
            f"epoch {e['epoch']}/{e['epochs']}  train loss {e['train_loss']:.4f} acc {e['train_acc'] * 100:.1f}%  "
            f"val loss {e['val_loss']:.4f} acc {e['val_acc'] * 100:.1f}%  "
            f"{e['train_images_per_s']:.0f} img/s  {e['epoch_time_s']:.1f}s{mem}{star}"
        )
        self._update(completed=e["epoch"] * self.steps_per_epoch)

    def _on_oom(self, e: dict) -> None:
        self._print(
            f"CUDA out of memory: micro-batch now {e['micro_batch']} "
            f"({e['accumulation_steps']} accumulation steps), training goes on",
            style="yellow",
        )

    def _on_skipped_image(self, e: dict) -> None:
        self._print(f"skipped unreadable image {e['path']}", style="yellow")

    def _on_resumed(self, e: dict) -> None:
        self._print(f"resumed from last.pth at epoch {e['epoch']}, step {e['step']}")

    def _on_stopped(self, e: dict) -> None:
        self._print(f"stopped at epoch {e['epoch']} step {e['step']}; last.pth is resumable", style="yellow")

    def _on_error(self, e: dict) -> None:
        self._print(f"trainer error: {e['message']}", style="red")
