"""The tuning database: every measured configuration, in SQLite, keyed by workload, target and toolchain.

A key is the SHA-256 of the operator's structural description (op, shapes, options), the target's
figures (and the RPC device key when measured remotely) and the toolchain's versions (TVM, LLVM,
PyTorch, optic's code generator): a record is reused only where the same code would be generated
and run on the same hardware. Each measurement is committed in its own transaction, so a tuning
run that crashes or is killed loses nothing it had measured; a second run of the same workload
finds its records and measures nothing. Failed candidates are recorded too (``seconds`` is NULL,
read back as ``inf``) so that they are not tried again.

The default file is ``$OPTIC_TUNING_DB``, else ``$XDG_CACHE_HOME/optic/tuning.db`` (``~/.cache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optic import targets
from optic.errors import OpticError
from optic.targets import Target

__all__ = ["ENV_VAR", "Record", "TuningDB", "best_record", "default_path", "target_fingerprint", "tuning_key"]

ENV_VAR = "OPTIC_TUNING_DB"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS workloads (
    key TEXT PRIMARY KEY,
    operator TEXT NOT NULL,      -- JSON: op, args, options
    description TEXT NOT NULL,   -- human-readable operator
    target TEXT NOT NULL,        -- JSON: the target's figures (and the RPC device)
    target_name TEXT NOT NULL,
    toolchain TEXT NOT NULL,     -- JSON: versions
    flops INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL REFERENCES workloads(key),
    config TEXT NOT NULL,        -- JSON, keys sorted
    seconds REAL,                -- median per call, NULL when the candidate failed
    status TEXT NOT NULL,        -- ok, build_error, run_error, wrong, timeout, crash
    error TEXT NOT NULL DEFAULT '',
    predicted REAL,              -- the cost model's seconds, when it ranked the candidate
    build_seconds REAL,
    samples TEXT,                -- JSON list of per-repeat seconds
    final_round REAL,            -- when it was re-timed side by side with the other finalists, if ever
    created REAL NOT NULL,
    UNIQUE (key, config)
);
CREATE INDEX IF NOT EXISTS records_by_key ON records (key, seconds);
CREATE TABLE IF NOT EXISTS settled (
    key TEXT NOT NULL,           -- a workload tuned (or left to the cost model) for a model at an effort level
    level TEXT NOT NULL,         -- the effort level ("fast", "full", a count): a later optimize at it measures nothing
    created REAL NOT NULL,
    PRIMARY KEY (key, level)
);
CREATE TABLE IF NOT EXISTS tactics (
    context TEXT PRIMARY KEY,    -- JSON: the tuning key, the chosen config and the candidates compared
    seconds TEXT NOT NULL,       -- JSON: candidate -> median seconds per call, alternated in one run
    created REAL NOT NULL
);
"""


def default_path() -> Path:
    """``$OPTIC_TUNING_DB``, else ``$XDG_CACHE_HOME/optic/tuning.db`` (``~/.cache/optic/tuning.db``)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "optic" / "tuning.db"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def target_fingerprint(target: str | Target, device: str | None = None) -> dict[str, Any]:
    """The figures of ``target`` that code and timings depend on (its table row without the prose), plus
    the LLVM CPU name for the host and the RPC device key when measured remotely."""
    t = targets.get(target)
    row = {k: v for k, v in dataclasses.asdict(t).items() if k not in ("source",)}
    if t.kind == "cpu" and device is None:
        from optic.tvm_compat import host_cpu, tvm_available

        row["llvm_cpu"] = host_cpu() if tvm_available() else None
    if device is not None:
        row["device"] = device
    return json.loads(_canonical(row))


def tuning_key(operator: Mapping[str, Any], target: Mapping[str, Any], toolchain: Mapping[str, Any]) -> str:
    """SHA-256 (hex, 32 digits) of the operator's, the target's and the toolchain's canonical JSON."""
    text = _canonical({"operator": operator, "target": target, "toolchain": toolchain})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Record:
    """One measured configuration."""

    config: dict[str, int]
    seconds: float  # inf when the candidate failed
    status: str
    error: str = ""
    predicted: float | None = None
    build_seconds: float | None = None
    created: float = 0.0
    final_round: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def best_record(records: list[Record]) -> Record | None:
    """The fastest correct record from the latest final round (its finalists were timed side by side,
    which beats comparing medians taken at different moments), else the fastest correct one."""
    ok = sorted((r for r in records if r.ok), key=lambda r: r.seconds)
    latest = max((r.final_round for r in ok if r.final_round is not None), default=None)
    ok = [r for r in ok if latest is None or r.final_round == latest]
    return ok[0] if ok else None


class TuningDB:
    """A tuning database file (created on first use). Use as a context manager, or call ``close``."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path).expanduser() if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self._transaction():
                for statement in _statements():
                    self._conn.execute(statement)
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        except (sqlite3.Error, OSError) as e:
            raise OpticError(f"cannot open the tuning database {self.path}: {e}. Pass another path "
                             f"(--db PATH or ${ENV_VAR}).") from None
        version = self._conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
        if int(version) != SCHEMA_VERSION:
            raise OpticError(f"the tuning database {self.path} has schema {version}, this optic reads "
                             f"{SCHEMA_VERSION}; use another file (--db PATH)")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    def __enter__(self) -> TuningDB:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    # -- writing --------------------------------------------------------------------------------------
    def register(self, key: str, operator: Mapping[str, Any], description: str, target: Mapping[str, Any],
                 toolchain: Mapping[str, Any], flops: int) -> None:
        """Record what ``key`` stands for (once; later calls change nothing)."""
        with self._transaction():
            self._conn.execute(
                "INSERT OR IGNORE INTO workloads VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, _canonical(operator), description, _canonical(target), str(target.get("name", "?")),
                 _canonical(toolchain), int(flops), time.time()))

    def add(self, key: str, config: Mapping[str, int], seconds: float, status: str, *, error: str = "",
            predicted: float | None = None, build_seconds: float | None = None,
            samples: list[float] | None = None, final_round: float | None = None) -> None:
        """Store one measurement, committed before this returns (a later crash cannot lose it).
        ``final_round``: the time of the final round that re-timed it (see :meth:`best`)."""
        with self._transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO records (key, config, seconds, status, error, predicted, build_seconds, "
                "samples, final_round, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, _canonical({k: int(v) for k, v in config.items()}),
                 seconds if math.isfinite(seconds) else None, status, error[:4000], predicted, build_seconds,
                 json.dumps(samples or []), final_round, time.time()))

    def add_tactic(self, context: str, seconds: Mapping[str, float]) -> None:
        """Store a per-kernel tactic verdict: the generated kernel and PyTorch's, timed in the model's process."""
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO tactics VALUES (?, ?, ?)",
                               (context, json.dumps({k: float(v) for k, v in seconds.items()}), time.time()))

    def settle(self, key: str, level: str) -> None:
        """Mark ``key`` as done for the effort level ``level`` (its measurements, or none when a time budget
        ran out first): ``optimize`` at that level does not tune it again."""
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO settled VALUES (?, ?, ?)", (key, level, time.time()))

    # -- reading --------------------------------------------------------------------------------------
    def settled(self, key: str, level: str) -> bool:
        return self._conn.execute("SELECT 1 FROM settled WHERE key = ? AND level = ?", (key, level)).fetchone() is not None

    def tactic(self, context: str) -> dict[str, float] | None:
        """The timings stored for ``context`` by :meth:`add_tactic`, or None."""
        row = self._conn.execute("SELECT seconds FROM tactics WHERE context = ?", (context,)).fetchone()
        return None if row is None else json.loads(row[0])

    def records(self, key: str) -> list[Record]:
        """Every record of ``key``, fastest first (failures last)."""
        rows = self._conn.execute(
            "SELECT config, seconds, status, error, predicted, build_seconds, created, final_round FROM records "
            "WHERE key = ? ORDER BY seconds IS NULL, seconds, id", (key,)).fetchall()
        return [Record(json.loads(c), math.inf if s is None else s, st, e, p, b, t, f)
                for c, s, st, e, p, b, t, f in rows]

    def best(self, key: str) -> Record | None:
        """The best record of ``key`` (see :func:`best_record`), or None."""
        return best_record(self.records(key))

    def summary(self) -> list[dict[str, Any]]:
        """One entry per workload: what it is, where, with which toolchain, how many records, the best."""
        out = []
        for key, op, desc, tname, tc, flops, created in self._conn.execute(
                "SELECT key, operator, description, target_name, toolchain, flops, created FROM workloads "
                "ORDER BY created"):
            counts = dict(self._conn.execute(
                "SELECT status, COUNT(*) FROM records WHERE key = ? GROUP BY status", (key,)).fetchall())
            best = self.best(key)
            out.append({
                "key": key, "operator": json.loads(op), "description": desc, "target": tname,
                "toolchain": json.loads(tc), "records": sum(counts.values()), "by_status": counts,
                "best_config": best.config if best else None, "best_seconds": best.seconds if best else None,
                "best_gflops": flops / best.seconds / 1e9 if best else None, "created": created,
            })
        return out

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])


def _statements() -> list[str]:
    return [s.strip() for s in _SCHEMA.split(";") if s.strip()]


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception): one writer at a time."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._conn.execute("ROLLBACK" if exc_type else "COMMIT")
