"""A persistent cache of black-box judge calls, so a rerun or a resumed run never pays twice.

SQLite in WAL mode: several processes (DDP ranks, a rerun next to a running job) may read and write the same
file. Each thread of each process gets its own connection (connections are not shared across threads or
``fork``); inserts are single ``INSERT OR IGNORE`` statements, atomic by themselves, so two writers of the
same key cannot corrupt anything (the first one wins; both replies answered the same request).

Only what is needed to answer the call again is stored: the raw reply text and the token usage, under a hash
of the request. No API key, header or URL ever reaches the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CachedReply:
    """A judge call's answer as the server gave it."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def cache_key(
    *,
    model: str,
    template_version: str,
    messages: Sequence[dict[str, str]],
    temperature: float,
    max_tokens: int | None,
    permutation: Sequence[int],
    schema: Mapping[str, Any] | None = None,
) -> str:
    """A hash of everything that determines the reply (messages include demonstrations and candidates; the
    JSON schema of structured output, when one is asked for)."""
    fields: dict[str, Any] = {
        "model": model,
        "template_version": template_version,
        "messages": list(messages),
        "temperature": float(temperature),
        "max_tokens": max_tokens,
        "permutation": [int(i) for i in permutation],
    }
    if schema is not None:  # absent otherwise: keys of earlier caches stay valid
        fields["schema"] = schema
    payload = json.dumps(
        fields,
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch a connection's database to write-ahead logging, waiting for other processes that open it too.

    Changing the journal mode needs the database to itself for a moment, and SQLite answers "database is
    locked" at once instead of waiting on its busy timeout (DDP ranks open the shared file together).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class JudgeCache:
    """Key -> :class:`CachedReply` in an SQLite file, safe for several threads and processes.

    Args:
        path: the SQLite file (created with its parent folders).
        busy_timeout_s: how long a writer waits for another process's lock before failing.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._connection()  # fail now, with the file's name, if the file is unusable

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            enable_wal(conn, self.busy_timeout_s)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, "
                "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created REAL NOT NULL)"
            )
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                conn.close()
                raise ValueError(
                    f"judge cache {self.path} has schema version {version}, this code reads "
                    f"{SCHEMA_VERSION}; use another cache_path"
                )
        except sqlite3.DatabaseError as err:
            raise ValueError(f"judge cache {self.path} is not a usable SQLite database: {err}") from err
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._all.append((os.getpid(), conn))
        return conn

    def get(self, key: str) -> CachedReply | None:
        row = (
            self._connection()
            .execute("SELECT reply, prompt_tokens, completion_tokens FROM replies WHERE key = ?", (key,))
            .fetchone()
        )
        return None if row is None else CachedReply(row[0], int(row[1]), int(row[2]))

    def put(self, key: str, reply: CachedReply) -> bool:
        """Store a reply; False when the key was already there (the stored reply is kept)."""
        cursor = self._connection().execute(
            "INSERT OR IGNORE INTO replies (key, reply, prompt_tokens, completion_tokens, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (key, reply.text, int(reply.prompt_tokens), int(reply.completion_tokens), time.time()),
        )
        return cursor.rowcount == 1

    def __len__(self) -> int:
        return int(self._connection().execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        """Close every connection this object opened in this process."""
        with self._lock:
            conns, self._all = self._all, []
        for pid, conn in conns:
            if pid != os.getpid():  # a connection inherited through fork belongs to the parent: leave it
                continue
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "busy_timeout_s": self.busy_timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.busy_timeout_s = state["busy_timeout_s"]
        self._local = threading.local()
        self._all = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"


__all__ = ["CachedReply", "JudgeCache", "cache_key"]
