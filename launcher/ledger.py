"""The SQLite run ledger (runs.db): every run, its phases and its cost. The only code that writes it."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from launcher.errors import RunNotFound

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
    resumed_from  TEXT
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
    "args_json handle_json summary_json best_val_acc billed_from billed_to cost_amount currency resumed_from"
).split()

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

    @property
    def args(self) -> dict:
        return json.loads(self.args_json or "{}")

    @property
    def handle(self) -> dict:
        return json.loads(self.handle_json or "{}")

    @property
    def summary(self) -> dict:
        return json.loads(self.summary_json or "{}")


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several gpu-run processes (train, attach, status) may share the file.
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

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
        row = self._db.execute(f"SELECT run_id, {', '.join(RUN_FIELDS)} FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if row is None:
            # Accept a unique prefix, as git does for commits.
            rows = self._db.execute(
                f"SELECT run_id, {', '.join(RUN_FIELDS)} FROM runs WHERE run_id LIKE ? ORDER BY created_at",
                [run_id.replace("%", "") + "%"],
            ).fetchall()
            if len(rows) != 1:
                hint = "several runs match" if rows else "no such run"
                raise RunNotFound(f"run {run_id!r}: {hint}; `gpu-run runs` lists the run ids")
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

    # phases -----------------------------------------------------------------------------------

    def start_phase(self, run_id: str, phase: str, at: float | None = None) -> float:
        at = time.time() if at is None else at
        with self._tx() as db:
            db.execute(
                "INSERT INTO phases (run_id, phase, started_at, status) VALUES (?, ?, ?, 'running')",
                [run_id, phase, at],
            )
        return at

    def end_phase(self, run_id: str, phase: str, status: str = "ok", detail: str | None = None,
                  at: float | None = None) -> None:
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
