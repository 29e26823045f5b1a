"""The SQLite run ledger (runs.db): every run, its phases and its cost. The only code that writes it."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpu_run.errors import GpuRunError, RunNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    backend       TEXT,
    model         TEXT,
    data_path     TEXT,
    dataset_id    TEXT,
    image_tag     TEXT,
    status        TEXT NOT NULL,
    exit_code     INTEGER,
    created_at    REAL NOT NULL,
    ended_at      REAL,
    run_dir       TEXT,
    args_json     TEXT,
    handle_json   TEXT,
    summary_json  TEXT,
    best_val_acc  REAL,
    billed_from   REAL,
    billed_to     REAL,
    cost_amount   REAL,
    currency      TEXT,
    resumed_from  TEXT,
    stop_status   TEXT,
    stop_detail   TEXT
);
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id      TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at    REAL NOT NULL,
    spec_json     TEXT,
    points_json   TEXT,
    rounds_json   TEXT,
    currency      TEXT
);
CREATE TABLE IF NOT EXISTS phases (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    phase       TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL,
    status      TEXT NOT NULL,
    detail      TEXT,
    PRIMARY KEY (run_id, phase, started_at)
);
"""

RUN_FIELDS = (
    "host backend model data_path dataset_id image_tag status exit_code created_at ended_at run_dir "
    "args_json handle_json summary_json best_val_acc billed_from billed_to cost_amount currency resumed_from "
    "stop_status stop_detail sweep_id sweep_point"
).split()
SWEEP_FIELDS = "host status created_at spec_json points_json rounds_json currency".split()

# Columns added after the first release, with their types: an older runs.db gains them on open.
ADDED_COLUMNS = {"stop_status": "TEXT", "stop_detail": "TEXT", "sweep_id": "TEXT", "sweep_point": "INTEGER"}

# How a run's machine ended (stop_status). STOP_CLOSED ends the run's billing; a stop that failed or
# was never confirmed (STOP_OPEN) leaves it billing until a later `gpu-run stop RUN` confirms one.
STOP_CLOSED = ("stopped", "kept_alive", "not_needed", "handed_over")
STOP_OPEN = ("failed", "unconfirmed")

# Statuses a run can be in; the last four are final.
ACTIVE_STATUSES = ("created", "running", "detached")
FINAL_STATUSES = ("succeeded", "failed", "stopped", "cancelled")


@dataclass
class Phase:
    phase: str
    started_at: float
    ended_at: float | None
    status: str
    detail: str | None

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass
class RunRecord:
    run_id: str
    host: str
    backend: str | None
    model: str | None
    data_path: str | None
    dataset_id: str | None
    image_tag: str | None
    status: str
    exit_code: int | None
    created_at: float
    ended_at: float | None
    run_dir: str | None
    args_json: str | None
    handle_json: str | None
    summary_json: str | None
    best_val_acc: float | None
    billed_from: float | None
    billed_to: float | None
    cost_amount: float | None
    currency: str | None
    resumed_from: str | None
    stop_status: str | None = None
    stop_detail: str | None = None
    sweep_id: str | None = None  # the sweep this run is a point of
    sweep_point: int | None = None  # which point (0-based, the grid's order)

    @property
    def stop_failed(self) -> bool:
        return self.stop_status in STOP_OPEN

    @property
    def args(self) -> dict:
        return json.loads(self.args_json or "{}")

    @property
    def summary(self) -> dict:
        return json.loads(self.summary_json or "{}")


@dataclass
class SweepRecord:
    """A sweep: its spec and points, and its rounds on the machine (a first run, then one per
    --resume), each with the billed span it had and its point runs."""

    sweep_id: str
    host: str
    status: str
    created_at: float
    spec_json: str | None
    points_json: str | None
    rounds_json: str | None
    currency: str | None

    @property
    def spec(self) -> dict:
        return json.loads(self.spec_json or "{}")

    @property
    def points(self) -> list[dict]:
        return json.loads(self.points_json or "[]")

    @property
    def rounds(self) -> list[dict]:
        return json.loads(self.rounds_json or "[]")


class LedgerError(GpuRunError):
    """runs.db cannot be opened or read."""


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching what starts with `prefix`: its own % and _ are literal (ESCAPE '\\')."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Private from the start: it holds every run's history, paths and costs. SQLite gives
            # its -wal and -shm files the database file's mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise LedgerError(f"cannot create the ledger {self.path}: {e.strerror}; check GPU_RUN_HOME") from None
        try:
            # Several gpu-run processes (train, attach, status) may share the file.
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
        except sqlite3.Error as e:
            raise LedgerError(
                f"the ledger {self.path} is unreadable ({e}); move it aside (mv {self.path} {self.path}.broken) "
                f"and gpu-run starts a new, empty one"
            ) from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # runs -------------------------------------------------------------------------------------

    def create_run(self, run_id: str, host: str, **fields) -> None:
        fields.setdefault("status", "created")
        fields.setdefault("created_at", time.time())
        cols = ["run_id", "host", *fields]
        with self._tx() as db:
            db.execute(
                f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [run_id, host, *fields.values()],
            )

    def update_run(self, run_id: str, **fields) -> None:
        bad = set(fields) - set(RUN_FIELDS)
        if bad:
            raise ValueError(f"unknown run fields {sorted(bad)}")
        with self._tx() as db:
            db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE run_id = ?",
                [*fields.values(), run_id],
            )

    def get_run(self, run_id: str) -> RunRecord:
        row = self._db.execute(
            f"SELECT run_id, {', '.join(RUN_FIELDS)} FROM runs WHERE run_id = ?", [run_id]
        ).fetchone()
        if row is None:
            if not run_id:
                raise RunNotFound("the run id is empty; `gpu-run runs` lists the run ids")
            # Accept a unique prefix, as git does for commits; `_` and `%` in it are not wildcards.
            rows = self._db.execute(
                f"SELECT run_id, {', '.join(RUN_FIELDS)} FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY created_at",
                [like_prefix(run_id)],
            ).fetchall()
            if not rows:
                raise RunNotFound(f"run {run_id!r}: no such run; `gpu-run runs` lists the run ids")
            if len(rows) > 1:
                shown = ", ".join(r[0] for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
                raise RunNotFound(f"run {run_id!r} is ambiguous: {len(rows)} runs match ({shown}); give more of the id")
            row = rows[0]
        return RunRecord(*row)

    def list_runs(self, host: str | None = None, limit: int | None = None) -> list[RunRecord]:
        sql = f"SELECT run_id, {', '.join(RUN_FIELDS)} FROM runs"
        params: list = []
        if host:
            sql += " WHERE host = ?"
            params.append(host)
        sql += " ORDER BY created_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [RunRecord(*r) for r in self._db.execute(sql, params).fetchall()]

    def sweep_runs(self, sweep_id: str) -> list[RunRecord]:
        rows = self._db.execute(
            f"SELECT run_id, {', '.join(RUN_FIELDS)} FROM runs WHERE sweep_id = ? ORDER BY created_at", [sweep_id]
        ).fetchall()
        return [RunRecord(*r) for r in rows]

    # sweeps -----------------------------------------------------------------------------------

    def create_sweep(self, sweep_id: str, host: str, **fields) -> None:
        fields.setdefault("status", "created")
        fields.setdefault("created_at", time.time())
        cols = ["sweep_id", "host", *fields]
        with self._tx() as db:
            db.execute(
                f"INSERT INTO sweeps ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [sweep_id, host, *fields.values()],
            )

    def update_sweep(self, sweep_id: str, **fields) -> None:
        bad = set(fields) - set(SWEEP_FIELDS)
        if bad:
            raise ValueError(f"unknown sweep fields {sorted(bad)}")
        with self._tx() as db:
            db.execute(
                f"UPDATE sweeps SET {', '.join(f'{k} = ?' for k in fields)} WHERE sweep_id = ?",
                [*fields.values(), sweep_id],
            )

    def get_sweep(self, sweep_id: str) -> SweepRecord:
        sql = f"SELECT sweep_id, {', '.join(SWEEP_FIELDS)} FROM sweeps WHERE sweep_id LIKE ? ESCAPE '\\' ORDER BY created_at"
        rows = self._db.execute(sql, [like_prefix(sweep_id)]).fetchall() if sweep_id else []
        exact = [r for r in rows if r[0] == sweep_id]
        if exact or len(rows) == 1:
            return SweepRecord(*(exact or rows)[0])
        if not rows:
            raise RunNotFound(f"sweep {sweep_id!r}: no such sweep; `gpu-run sweep list` lists them")
        raise RunNotFound(f"sweep {sweep_id!r} is ambiguous: {len(rows)} sweeps match; give more of the id")

    def list_sweeps(self, limit: int | None = None) -> list[SweepRecord]:
        sql = f"SELECT sweep_id, {', '.join(SWEEP_FIELDS)} FROM sweeps ORDER BY created_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [SweepRecord(*r) for r in self._db.execute(sql).fetchall()]

    # phases -----------------------------------------------------------------------------------

    def start_phase(self, run_id: str, phase: str, at: float | None = None) -> float:
        at = time.time() if at is None else at
        with self._tx() as db:
            db.execute(
                "INSERT INTO phases (run_id, phase, started_at, status) VALUES (?, ?, ?, 'running')",
                [run_id, phase, at],
            )
        return at

    def end_phase(
        self, run_id: str, phase: str, status: str = "ok", detail: str | None = None, at: float | None = None
    ) -> None:
        at = time.time() if at is None else at
        with self._tx() as db:
            db.execute(
                "UPDATE phases SET ended_at = ?, status = ?, detail = ? "
                "WHERE run_id = ? AND phase = ? AND ended_at IS NULL",
                [at, status, detail, run_id, phase],
            )

    @contextmanager
    def phase(self, run_id: str, phase: str) -> Iterator[None]:
        """Record a phase's start and end; an exception marks it failed and propagates."""
        self.start_phase(run_id, phase)
        try:
            yield
        except KeyboardInterrupt:
            self.end_phase(run_id, phase, "interrupted")
            raise
        except BaseException as e:
            self.end_phase(run_id, phase, "failed", str(e)[:500])
            raise
        self.end_phase(run_id, phase, "ok")

    def phases(self, run_id: str) -> list[Phase]:
        rows = self._db.execute(
            "SELECT phase, started_at, ended_at, status, detail FROM phases WHERE run_id = ? ORDER BY started_at",
            [run_id],
        ).fetchall()
        return [Phase(*r) for r in rows]
