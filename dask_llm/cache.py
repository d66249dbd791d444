"""The persistent result cache: every paid answer is kept, so nothing is paid for twice.

A job over 130k rows that is killed (or fails) halfway must, when rerun, pay
only for the calls it has not made yet. So the engine writes each answer the
moment its call succeeds, not at partition end, keyed by
``make_key(chain fingerprint, row inputs)``; a rerun reads them back.

Why SQLite in WAL mode
    One file, no server, in the standard library. WAL lets readers proceed
    while one writer commits, and a commit is a short append to the ``-wal``
    file, so many writers queue for microseconds, not milliseconds.
    ``synchronous=NORMAL`` skips the fsync per commit: a committed row is in
    the OS page cache, so it survives the *process* being killed (``kill -9``,
    OOM killer, a dying Dask worker); only an OS crash or power loss can take
    the last few commits, which then are simply paid for again.

Where it is safe
    Threads, processes and Dask ``distributed`` worker processes **on one
    machine**, all sharing one file. Each (process, thread) opens its own
    connection lazily (sqlite3 connections are bound to a thread, and one
    inherited across ``fork`` must not be used: a PID change opens a new one);
    ``busy_timeout`` and a retry make writers wait for each other instead of
    failing. A ``SQLiteCache`` pickles as its path and options, so it can be
    shipped to workers and reopens there.

    SQLite on a **network filesystem** (NFS, SMB, most cloud file shares) is
    *not* safe: its locks do not hold there and the file can be corrupted.
    When workers sit on several machines, implement ``ResultCache`` over a
    shared store (Redis, a database, an object store). Any object with
    ``get_many``/``put``/``close`` that pickles will do, e.g.::

        class RedisCache:
            def __init__(self, url: str) -> None:
                self.url, self._client = url, None

            def _redis(self) -> redis.Redis:
                if self._client is None:  # connect lazily, in the worker
                    self._client = redis.Redis.from_url(self.url)
                return self._client

            def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
                values = self._redis().mget(keys)
                return {k: json.loads(v) for k, v in zip(keys, values) if v is not None}

            def put(self, key: str, value: Any) -> None:
                self._redis().set(key, json.dumps(value))  # returns once stored

            def close(self) -> None:
                if self._client is not None:
                    self._client.close()
                    self._client = None

            def __reduce__(self) -> Any:  # ship the address, not the socket
                return (RedisCache, (self.url,))

    and pass it as ``enrich(..., cache=RedisCache("redis://cache-host:6379/0"))``.

Security
    The file and its ``-wal``/``-shm`` companions have mode 0600 (the file is
    created with that mode before SQLite opens it, and SQLite gives its
    companions the mode of the database file; no process-wide umask change).
    Values are model answers; the API key is never part of a key or a value.
    Every row carries a checksum over its key and value, checked on read: an
    entry that was corrupted, edited, or copied under another key, or whose
    JSON does not decode, is ignored (a miss, never returned), deleted, and
    so recomputed.

Durability
    ``put`` returns after its own transaction has committed. A ``kill -9``
    loses at most the calls in flight at that moment.

Cost, measured with ``benchmarks/cache.py`` (2-core shared VM, ext4, SQLite
3.40, Python 3.11, a ~100-byte JSON answer, median of 3 runs; bare sqlite3
with the same pragmas and statements, in the same run, in brackets):

    ==========================================  ================================
    one ``put``, 1 process                      13 us median (bare: 8.5 us)
    one ``put``, 4 processes putting at once    16 us median; 37k puts/s in
                                                total (bare: 47k/s)
    ``get_many`` of 1,000 present keys          3.4 ms (bare: 1.6 ms; the rest
                                                is checksums and JSON decoding)
    the same while 4 processes put (32k/s)      4.4 ms (bare: 2.4 ms)
    ==========================================  ================================

A ``put`` is tens of thousands of times cheaper than the model call (~1 s)
it records, and far below the 0.5 ms at which batching would be worth it,
so each answer is written alone as soon as its call finishes: there is no
batch to lose on a kill.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import pandas as pd

__all__ = [
    "MemoryCache",
    "ReadOnlySQLiteCache",
    "ResultCache",
    "SQLiteCache",
    "check_cache",
    "make_key",
    "open_cache",
    "read_only",
    "request_key",
]

# Part of every checksum: bump it when the stored format changes, and old rows
# are ignored (recomputed) instead of misread.
_FORMAT = "dask-llm-cache-1"
# Request keys live in the same table; their own prefix keeps them apart from row keys.
_REQUEST_FORMAT = "dask-llm-request-1"
# Keys per SELECT: below SQLite's smallest default limit of bound variables (999).
_CHUNK = 500
#: Held while a database file is created (see ``SQLiteCache._connection``).
_CREATE_LOCK = threading.Lock()
_T = TypeVar("_T")
# Connections inherited across fork: kept, unused, so that none is closed under the parent.
_FROM_PARENT: list[sqlite3.Connection] = []
log = logging.getLogger(__name__)


@runtime_checkable
class ResultCache(Protocol):
    """Where paid answers are kept, keyed by ``make_key``.

    Implementations must be picklable (the cache travels to worker processes;
    pickle the address or path and reconnect lazily) and safe to call from
    several threads.
    """

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The JSON-decoded values of those ``keys`` that have a valid entry (hits only)."""
        ...

    def put(self, key: str, value: Any) -> None:
        """Store a JSON-able ``value``; it is durable when this returns."""
        ...

    def close(self) -> None:
        """Release connections; the cache may be used again afterwards (it reopens)."""
        ...


# -- keys ----------------------------------------------------------------------------------
def make_key(fingerprint: str, inputs: Mapping[str, Any]) -> str:
    """The cache key of a chain (by its hex ``fingerprint``) applied to one row's inputs.

    A sha256 hex digest over the fingerprint and a canonical JSON of the inputs
    (sorted keys, compact, unicode kept), so the same inputs in any order give
    the same key. Inputs may be ``str``, ``int``, ``float``, ``bool``, ``None``,
    numpy scalars, dates and pandas ``Timestamp`` (ISO format), and lists,
    tuples or str-keyed dicts of those. ``NaN`` and infinities are encoded as
    themselves (distinct from the strings ``"nan"`` or ``"inf"``), ``pd.NA``
    and ``pd.NaT`` as distinct markers.

    Raises ``TypeError`` naming the variable (and the place inside it) for any
    other value.
    """
    plain = {
        str(name): value if type(value) is str else _plain(value, repr(str(name)))
        for name, value in inputs.items()
    }
    text = _KEY_JSON.encode(plain)
    return hashlib.sha256(f"{fingerprint}\0{text}".encode()).hexdigest()


# One encoder, reused: json.dumps builds one per call when given options.
_KEY_JSON = json.JSONEncoder(
    sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True
)


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON data, the same for every spelling of the same input."""
    if value is None or isinstance(value, str | bool | int | float):
        return value  # float NaN/inf: json.dumps(allow_nan=True) writes NaN, Infinity
    if value is pd.NA or value is pd.NaT:
        # Prompts render these as "<NA>" / "NaT": never the same key as None or a string.
        return {"\0pandas": "NA" if value is pd.NA else "NaT"}
    if isinstance(value, np.datetime64 | np.timedelta64):
        return str(value)  # .item() would give an int of nanoseconds
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if isinstance(value, datetime.date | datetime.time):  # pd.Timestamp is a datetime
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray | pd.api.extensions.ExtensionArray | pd.Series | pd.Index):
        # Lists read back from Parquet arrive as numpy arrays: keyed like the list.
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value.tolist())]
    as_py = getattr(value, "as_py", None)  # pyarrow scalars, lists and arrays
    if callable(as_py) and type(value).__module__.startswith("pyarrow"):
        return _plain(as_py(), where)
    to_pylist = getattr(value, "to_pylist", None)
    if callable(to_pylist) and type(value).__module__.startswith("pyarrow"):
        return _plain(to_pylist(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"input {where} has a {type(k).__name__} key {k!r}; "
                    "only str keys can key the cache"
                )
            out[str(k)] = _plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"input {where} is a {type(value).__name__}, which cannot key the cache: "
        "pass str, numbers, bool, None, timestamps, or lists/dicts of those"
    )


def request_key(method: str, path: str, body: bytes) -> str:
    """The cache key of one HTTP request to the provider: what is actually sent.

    A sha256 over the method, the URL path (``/v1/chat/completions``; not the
    host, so a proxy or a moved endpoint keeps its answers) and the JSON body
    with its keys sorted (the SDK's key order is not part of the request's
    meaning). Model, messages, tools, response format and sampling parameters
    all live in the body, so whatever a chain computed to build its request
    (closures, globals, factories) is in the key. A body that is not JSON is
    keyed by its bytes. ``service_tier`` is left out: it says how an answer is
    served and paid for (Flex, list price), not what it says, so a Flex run
    reuses answers paid at list price and the other way round.
    """
    try:
        payload = json.loads(body)
        if isinstance(payload, dict):
            payload.pop("service_tier", None)
        canonical = json.dumps(
            payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        ).encode()
    except ValueError:
        canonical = body
    h = hashlib.sha256(f"{_REQUEST_FORMAT}\0{method.upper()} {path}\0".encode())
    h.update(canonical)
    return h.hexdigest()


def _dump(value: Any) -> str:
    """The stored text of a value: compact JSON, key order kept (it is the answer's order)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _checksum(key: str, value: str) -> str:
    return hashlib.sha256(f"{_FORMAT}\0{key}\0{value}".encode()).hexdigest()


# -- SQLite ----------------------------------------------------------------------------------
class SQLiteCache:
    """``ResultCache`` in one SQLite file (WAL), shared by every process on one machine.

    ``path`` is made absolute (workers may have another working directory);
    its directory is created if missing. ``timeout`` (seconds) is how long a
    write waits for other writers before it raises ``sqlite3.OperationalError``.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.timeout = timeout
        self._local = threading.local()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._open: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._counts = dict.fromkeys(("hits", "misses", "puts", "invalid"), 0)

    def __repr__(self) -> str:
        return f"SQLiteCache({self.path!r})"

    def __reduce__(self) -> tuple[Callable[..., SQLiteCache], tuple[str, float]]:
        # Connections, locks and counters stay behind; the copy reopens on first use.
        return (_reopen, (self.path, self.timeout))

    # connections
    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            self._forget_parent()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        # Create the file 0600 before SQLite does; SQLite then creates -wal and -shm
        # with the database file's mode. (umask would affect every thread's files.)
        # Only a file that does not exist yet, and under a lock of this process: closing
        # any descriptor of a database drops every POSIX lock this process holds on it,
        # those of its other threads' connections too (sqlite.org/howtocorrupt.html,
        # 2.2), and another process may then write over their last commits (CI saw a
        # thread's puts lost while three processes wrote to the same file).
        with _CREATE_LOCK, contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):  # absent, or another user's file
                os.chmod(self.path + suffix, 0o600)
        # check_same_thread=False only so that close() may close the connection of a
        # thread that has ended; each connection is otherwise used by its own thread.
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._retry_locked(lambda: self._setup(conn))
        except BaseException:
            conn.close()
            raise
        self._local.conn = conn
        with self._lock:
            self._open.append((threading.current_thread(), conn))
        return conn

    def _forget_parent(self) -> None:
        """In a forked child: never use the parent's connections, nor close them.

        They stay referenced so that they are not closed (by garbage collection)
        while the parent may still be using the same file.
        """
        _FROM_PARENT.extend(conn for _, conn in self._open)
        self._pid = os.getpid()
        self._local = threading.local()
        self._lock = threading.Lock()  # the parent's may have been held at fork
        self._open = []
        self._counts = dict.fromkeys(self._counts, 0)

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":  # persistent: only the first opener switches
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS results ("
            "key TEXT PRIMARY KEY, value TEXT NOT NULL, checksum TEXT NOT NULL, "
            "created REAL NOT NULL)"
        )

    def _retry_locked(self, action: Callable[[], _T]) -> _T:
        """Run ``action``, retrying while another connection holds the database.

        ``busy_timeout`` covers most waits; SQLite still returns "locked"/"busy"
        at once in a few cases (switching to WAL, a snapshot that must restart).
        """
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                message = str(exc)
                if ("locked" not in message and "busy" not in message) or (
                    time.monotonic() > deadline
                ):
                    raise
                time.sleep(0.005)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    # the protocol
    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The valid cached values of ``keys`` (hits only), one query per 500 keys."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        if not wanted:
            return found
        conn = self._connection()
        bad: list[tuple[str, Any, Any]] = []
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            rows = self._retry_locked(functools.partial(_select, conn, chunk))
            for key, value, checksum in rows:
                try:
                    if not isinstance(value, str) or checksum != _checksum(key, value):
                        raise ValueError("checksum mismatch")
                    found[key] = json.loads(value)
                except ValueError:  # JSONDecodeError too
                    bad.append((key, value, checksum))
        if bad:
            log.info(
                "dask-llm: %d invalid cache entries dropped (they will be asked again)", len(bad)
            )
            # Delete exactly what was read: a good entry written meanwhile stays.
            with contextlib.suppress(sqlite3.OperationalError):
                conn.executemany(
                    "DELETE FROM results WHERE key = ? AND value IS ? AND checksum IS ?", bad
                )
        self._count(hits=len(found), misses=len(wanted) - len(found), invalid=len(bad))
        return found

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-able, else ``TypeError``/``ValueError``), committed on return."""
        text = _dump(value)
        row = (key, text, _checksum(key, text), time.time())
        conn = self._connection()
        self._retry_locked(
            lambda: conn.execute(
                "INSERT OR REPLACE INTO results (key, value, checksum, created) "
                "VALUES (?, ?, ?, ?)",
                row,
            )
        )
        self._count(puts=1)

    def close(self) -> None:
        """Close this thread's connection and those of threads that have ended.

        Connections of live threads stay open (they may be in use); each thread
        closes its own. Any later call reopens.
        """
        if self._pid != os.getpid():
            self._forget_parent()
            return
        me = threading.current_thread()
        with self._lock:
            done = [(t, c) for t, c in self._open if t is me or not t.is_alive()]
            self._open = [(t, c) for t, c in self._open if not (t is me or not t.is_alive())]
        for _, conn in done:
            conn.close()
        self._local.conn = None

    def __len__(self) -> int:
        """Entries stored (valid or not: validity is checked on read)."""
        (n,) = self._connection().execute("SELECT COUNT(*) FROM results").fetchone()
        return int(n)

    def stats(self) -> dict[str, int]:
        """This process's ``hits``, ``misses``, ``puts`` and ``invalid`` entries dropped."""
        with self._lock:
            return dict(self._counts)


class ReadOnlySQLiteCache:
    """A read-only view of a ``SQLiteCache`` file, for dry runs (``estimate``).

    It never creates the file, its directory or its table: a missing file is an
    empty cache. Each ``get_many`` opens a ``mode=ro`` connection and closes it
    again, so nothing is left open. ``put`` refuses.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))

    def __repr__(self) -> str:
        return f"ReadOnlySQLiteCache({self.path!r})"

    def __reduce__(self) -> tuple[type[ReadOnlySQLiteCache], tuple[str]]:
        return (ReadOnlySQLiteCache, (self.path,))

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        wanted = list(dict.fromkeys(keys))
        if not wanted or not os.path.exists(self.path):
            return {}
        uri = "file:" + urllib.parse.quote(self.path) + "?mode=ro"
        found: dict[str, Any] = {}
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as conn:
                for start in range(0, len(wanted), _CHUNK):
                    for key, value, checksum in _select(conn, wanted[start : start + _CHUNK]):
                        if isinstance(value, str) and checksum == _checksum(key, value):
                            with contextlib.suppress(ValueError):
                                found[key] = json.loads(value)
        except sqlite3.OperationalError:  # no table yet, or unreadable: nothing cached
            return found
        return found

    def put(self, key: str, value: Any) -> None:
        raise PermissionError(f"{self!r} is read-only")

    def close(self) -> None:
        pass


def read_only(cache: ResultCache | None) -> ResultCache | None:
    """A view of ``cache`` that cannot create or write anything (SQLite files); else itself."""
    if isinstance(cache, SQLiteCache):
        return ReadOnlySQLiteCache(cache.path)
    return cache


def check_cache(cache: ResultCache, spec: Any) -> None:
    """Open ``cache`` now (one lookup), so that an unusable location fails at ``enrich()``.

    Raises ``ValueError`` with one line naming the location and the reason.
    """
    try:
        cache.get_many(["dask-llm-check"])
    # A ResultCache may be anyone's code over any store: whatever it raises means
    # the location is unusable, which is what this check is for.
    except Exception as exc:
        where = getattr(cache, "path", None) or repr(spec)
        raise ValueError(
            f"cache={where!s}: cannot open the result cache ({type(exc).__name__}: {exc}); "
            "pass another path, or cache=False to run without one"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            cache.close()


def _select(conn: sqlite3.Connection, keys: list[str]) -> list[tuple[Any, Any, Any]]:
    marks = ",".join("?" * len(keys))
    query = f"SELECT key, value, checksum FROM results WHERE key IN ({marks})"
    return conn.execute(query, keys).fetchall()


def _reopen(path: str, timeout: float) -> SQLiteCache:
    return SQLiteCache(path, timeout=timeout)


# -- memory ----------------------------------------------------------------------------------
class MemoryCache:
    """``ResultCache`` in a dict, for tests and one-off runs. Pickles empty.

    Values are stored as JSON text, so ``get_many`` returns fresh copies and a
    value that a ``SQLiteCache`` would refuse is refused here too.
    """

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[MemoryCache], tuple[()]]:
        return (MemoryCache, ())

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        with self._lock:
            texts = {k: self._data[k] for k in keys if k in self._data}
        return {k: json.loads(t) for k, t in texts.items()}

    def put(self, key: str, value: Any) -> None:
        text = _dump(value)
        with self._lock:
            self._data[key] = text

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def close(self) -> None:
        pass


# -- the cache= option -------------------------------------------------------------------------
def open_cache(
    spec: str | os.PathLike[str] | ResultCache | bool | None,
    *,
    default_path: str | os.PathLike[str],
) -> ResultCache | None:
    """The cache that ``enrich(cache=spec)`` uses.

    ``True`` or ``None``: a ``SQLiteCache`` at ``default_path``; ``False``: no
    cache; a path: a ``SQLiteCache`` there; an object with ``get_many``,
    ``put`` and ``close``: that object. Anything else raises ``TypeError``.
    """
    if spec is False:
        return None
    if spec is True or spec is None:
        return SQLiteCache(default_path)
    if isinstance(spec, str | os.PathLike):
        if not os.fspath(spec):
            raise ValueError("cache= got an empty path; pass a file path, True or False")
        return SQLiteCache(spec)
    if isinstance(spec, ResultCache):
        return spec
    raise TypeError(
        "cache= takes True (the default file), False (no cache), a file path, or an "
        f"object with get_many/put/close (the ResultCache protocol), not {type(spec).__name__}"
    )
