"""The server's jobs in an embedded SQLite database (stdlib `sqlite3`, WAL), so that a restart finds every job a
crash interrupted: one row per job, and the loss of each training step for the loss curve.

Only the server's own process writes here; one connection, shared by its threads under a lock. WAL with
`synchronous=NORMAL` keeps every committed row through a SIGKILL of the process (not through a power cut).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

State = Literal["queued", "running", "done", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- finetune-lora | generate
    state TEXT NOT NULL,             -- queued | running | done | failed | cancelled
    step INTEGER NOT NULL DEFAULT 0, -- progress: training or denoising steps done ...
    total INTEGER NOT NULL DEFAULT 0,-- ... of this many
    params TEXT NOT NULL,            -- JSON: what was asked for, enough to run it again after a restart
    result TEXT,                     -- JSON, once done
    error TEXT,                      -- why it failed or was cancelled
    owner TEXT,                      -- hash of the API key that made it (NULL without --api-key)
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS losses (
    job TEXT NOT NULL,
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    PRIMARY KEY (job, step)          -- a resumed run rewrites the steps it repeats
);
"""


@dataclass
class JobRecord:
    """One row of `jobs`, JSON columns decoded."""

    id: str
    kind: str
    state: str
    step: int
    total: int
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    owner: str | None
    created: float
    started: float | None
    finished: float | None

    @property
    def final(self) -> bool:
        return self.state in FINAL


class JobStore:
    """Jobs and their losses in `path` (created with its folder if missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # autocommit (isolation_level=None): every statement is its own transaction, committed when it returns
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------------------
    # Writing

    def add(self, kind: str, params: dict[str, Any], owner: str | None, total: int = 0,
            job_id: str | None = None) -> JobRecord:
        """A new queued job; `job_id` defaults to a random one (IDs are unguessable: they are capabilities too)."""
        job_id = job_id or uuid.uuid4().hex
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, kind, state, total, params, owner, created) "
                             "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                             (job_id, kind, total, json.dumps(params), owner, time.time()))
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> None:
        """Set columns of one job: state, step, total, result (a dict), error, started, finished."""
        allowed = {"state", "step", "total", "result", "error", "started", "finished"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"update() takes {sorted(allowed)}, got {sorted(fields)}")
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def finish(self, job_id: str, state: State, result: dict[str, Any] | None = None,
               error: str | None = None) -> None:
        self.update(job_id, state=state, result=result, error=error, finished=time.time())

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM losses WHERE job = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def record_loss(self, job_id: str, step: int, loss: float) -> None:
        """The step's loss and the job's progress, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO losses (job, step, loss) VALUES (?, ?, ?)", (job_id, step, loss))
            self._db.execute("UPDATE jobs SET step = ? WHERE id = ?", (step, job_id))
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------------
    # Reading

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row is not None else None

    def list(self, owner: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest `limit` jobs; only `owner`'s when given."""
        query, args = "SELECT * FROM jobs", ()
        if owner is not None:
            query, args = query + " WHERE owner = ?", (owner,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created DESC LIMIT ?", (*args, limit)).fetchall()
        return [_record(row) for row in rows]

    def unfinished(self, kind: str | None = None) -> list[JobRecord]:
        """Queued and running jobs (of `kind`), oldest first: what a restart must take up again."""
        query = "SELECT * FROM jobs WHERE state IN ('queued', 'running')"
        args: tuple = ()
        if kind is not None:
            query, args = query + " AND kind = ?", (kind,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created", args).fetchall()
        return [_record(row) for row in rows]

    def losses(self, job_id: str) -> list[tuple[int, float]]:
        with self._lock:
            rows = self._db.execute("SELECT step, loss FROM losses WHERE job = ? ORDER BY step", (job_id,)).fetchall()
        return [(row["step"], row["loss"]) for row in rows]


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["params"] = json.loads(values["params"])
    values["result"] = json.loads(values["result"]) if values["result"] is not None else None
    return JobRecord(**values)
