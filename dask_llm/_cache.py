"""The persistent result cache: every paid answer is kept, so nothing is paid for twice.

Keys are ``make_key(chain fingerprint, row inputs)``; values are the chain's
normalised result as JSON. The engine writes each answer the moment its call
succeeds (not at partition end), so a job killed at any moment loses at most
the calls that were in flight; a rerun reads the rest back.

``SQLiteCache`` is the default: one file, WAL mode, ``synchronous=NORMAL``
(a commit survives the writing process being killed; only an OS crash or
power loss can take the last commits), one connection per process and
thread, ``busy_timeout`` for concurrent writers. That is safe for threads,
processes and ``distributed`` workers **on one machine**. SQLite over a
network filesystem is not safe (its locks do not hold there): when workers
sit on several machines, implement ``ResultCache`` over a shared store, e.g.::

    class RedisCache:
        def __init__(self, url): self.url = url; self._r = None
        def _redis(self):
            if self._r is None: self._r = redis.Redis.from_url(self.url)
            return self._r
        def get_many(self, keys):
            values = self._redis().mget(keys)
            return {k: json.loads(v) for k, v in zip(keys, values) if v is not None}
        def put(self, key, value): self._redis().set(key, json.dumps(value))
        def close(self): pass
        def __reduce__(self): return (RedisCache, (self.url,))

and pass it as ``enrich(..., cache=RedisCache("redis://..."))``.

Security: the file (and its ``-wal``/``-shm``) is created with mode 0600.
Values are model answers; the API key is never part of a key or a value.
Entries are validated on read: each row carries a checksum over its key and
value, and one that does not match (corrupted, edited, or copied from another
key) or whose JSON does not decode is ignored, deleted and recomputed, never
returned.

Measured here (2 cores, SQLite 3.40, WAL, one row = a short JSON answer):
see ``benchmarks/cache.py``; a ``put`` costs well under a millisecond, small
next to a model call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

_FORMAT = "dask-llm-cache-1"
_SETUP_LOCK = threading.Lock()
_CHUNK = 500


@runtime_checkable
class ResultCache(Protocol):
    """Where paid answers are kept. Must be picklable (it travels to workers)."""

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The cached values of those ``keys`` that have one (JSON-decoded)."""

    def put(self, key: str, value: Any) -> None:
        """Store a JSON-able ``value``; durable when it returns."""

    def close(self) -> None:
        """Release connections (the cache may be used again afterwards)."""


def _plain(value: Any, name: str) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _plain(value.item(), name)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v, name) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, name) for k, v in value.items()}
    raise TypeError(f"input {name!r} is a {type(value).__name__}, which cannot key the cache")


def make_key(fingerprint: str, inputs: Mapping[str, Any]) -> str:
    """Cache key of a chain (by fingerprint) applied to one row's resolved inputs."""
    plain = {str(k): _plain(v, str(k)) for k, v in inputs.items()}
    text = json.dumps(plain, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(f"{fingerprint}\0{text}".encode()).hexdigest()


def _checksum(key: str, value: str) -> str:
    return hashlib.sha256(f"{_FORMAT}\0{key}\0{value}".encode()).hexdigest()


class SQLiteCache:
    """``ResultCache`` in one SQLite file (WAL), for every process on one machine."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.timeout = timeout
        self._local = threading.local()
        self._counts = {"hits": 0, "misses": 0, "puts": 0, "invalid": 0}

    def __repr__(self) -> str:
        return f"SQLiteCache({self.path!r})"

    def __reduce__(self) -> Any:
        return (SQLiteCache, (self.path,), {"timeout": self.timeout})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.timeout = state["timeout"]

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        pid = getattr(self._local, "pid", None)
        if conn is not None and pid == os.getpid():
            return conn
        directory = os.path.dirname(self.path)
        with _SETUP_LOCK:  # umask is process-wide: no other thread may see ours
            os.makedirs(directory, mode=0o700, exist_ok=True)
            old = os.umask(0o077)  # the -wal and -shm files, too
            try:
                if not os.path.exists(self.path):
                    os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
                conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
                self._retry_locked(lambda: self._setup(conn))
            finally:
                os.umask(old)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS results ("
            "key TEXT PRIMARY KEY, value TEXT NOT NULL, checksum TEXT NOT NULL, "
            "created REAL NOT NULL)"
        )

    def _retry_locked(self, action: Any) -> Any:
        """Run ``action``, retrying while another writer holds the database (within timeout)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if not keys:
            return found
        conn = self._connection()
        bad = []
        for start in range(0, len(keys), _CHUNK):
            chunk = list(keys[start : start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT key, value, checksum FROM results WHERE key IN ({marks})",
                chunk,
            ).fetchall()
            for key, value, checksum in rows:
                try:
                    if checksum != _checksum(key, value):
                        raise ValueError("checksum")
                    found[key] = json.loads(value)
                except (ValueError, TypeError):
                    bad.append(key)
        if bad:
            self._counts["invalid"] += len(bad)
            with contextlib.suppress(sqlite3.Error):
                conn.executemany("DELETE FROM results WHERE key = ?", [(k,) for k in bad])
        self._counts["hits"] += len(found)
        self._counts["misses"] += len(keys) - len(found)
        return found

    def put(self, key: str, value: Any) -> None:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        conn = self._connection()
        row = (key, text, _checksum(key, text), time.time())
        self._retry_locked(
            lambda: conn.execute(
                "INSERT OR REPLACE INTO results (key, value, checksum, created) "
                "VALUES (?, ?, ?, ?)",
                row,
            )
        )
        self._counts["puts"] += 1

    def __len__(self) -> int:
        (n,) = self._connection().execute("SELECT COUNT(*) FROM results").fetchone()
        return int(n)

    def stats(self) -> dict[str, int]:
        """This process's hits, misses, puts and invalid entries dropped."""
        return dict(self._counts)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local = threading.local()


class MemoryCache:
    """``ResultCache`` in a dict: for tests and one-off runs. Pickles empty."""

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> Any:
        return (MemoryCache, ())

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        with self._lock:
            return {k: json.loads(self._data[k]) for k in keys if k in self._data}

    def put(self, key: str, value: Any) -> None:
        text = json.dumps(value, allow_nan=False)
        with self._lock:
            self._data[key] = text

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        pass


def open_cache(
    spec: str | os.PathLike[str] | ResultCache | bool | None, *, default_path: str
) -> ResultCache | None:
    """``True``/``None`` -> SQLite at ``default_path``; ``False`` -> none; a path; a cache."""
    if spec is False:
        return None
    if spec is True or spec is None:
        return SQLiteCache(default_path)
    if isinstance(spec, str | os.PathLike):
        return SQLiteCache(spec)
    if isinstance(spec, ResultCache):
        return spec
    raise TypeError(
        f"cache= takes True, False, a path, or an object with get_many/put/close, "
        f"not {type(spec).__name__}"
    )
