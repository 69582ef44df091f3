"""A persistent cache of black-box judge calls, so a rerun or a resumed run never pays twice.

SQLite in WAL mode, safe for several threads and processes; only the reply text and token usage are stored,
under a hash of the request, never a key, header or URL (docs/judges.md).
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

from cyclealign_pl.judges.base import JudgeUnavailable

SCHEMA_VERSION = 1
_CREATING_S = 5.0  # an empty cache file younger than this is being created by another process
NEW_CACHE_HINT = (
    "to go on, point --model.judge.init_args.cache_path to a new file, accepting to pay again for the "
    "replies it held (the spend so far is kept in the run's judge_ledger.sqlite)"
)


class JudgeCacheError(JudgeUnavailable, ValueError):
    """The cache file cannot be used (empty although it existed, corrupt, another schema): one line naming
    the file and how to go on; never taken as a fresh cache, which would pay again in silence."""


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
        if self._emptied():
            raise JudgeCacheError(f"judge cache {self.path} is empty (0 bytes) but existed: {NEW_CACHE_HINT}")
        conn = self._connection()  # fail now, with the file's name, if the file is unusable
        try:
            problem = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as err:
            problem = str(err)
        if problem != "ok":
            self.close()
            raise JudgeCacheError(f"judge cache {self.path} is corrupt ({problem}): {NEW_CACHE_HINT}")

    def _emptied(self) -> bool:
        """An empty file that SQLite would take for a new database, and not one another process (a DDP
        rank) is creating this moment: empty for longer than that takes."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        return st.st_size == 0 and time.time() - st.st_mtime > _CREATING_S

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
                raise JudgeCacheError(
                    f"judge cache {self.path} has schema version {version}, this code reads "
                    f"{SCHEMA_VERSION}; use another cache_path"
                )
        except sqlite3.DatabaseError as err:
            if not os.access(self.path.parent, os.W_OK) or (
                self.path.exists() and not os.access(self.path, os.W_OK)
            ):
                raise JudgeCacheError(
                    f"judge cache {self.path} cannot be written (read-only file or folder: {err}): make it "
                    "writable, or point --model.judge.init_args.cache_path to a writable file"
                ) from err
            raise JudgeCacheError(
                f"judge cache {self.path} is not a usable SQLite database ({err}): {NEW_CACHE_HINT}"
            ) from err
        except OSError as err:  # a read-only folder, a full disk
            raise JudgeCacheError(f"judge cache {self.path}: cannot create it ({err.strerror})") from err
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._all.append((os.getpid(), conn))
        return conn

    def get(self, key: str) -> CachedReply | None:
        try:
            row = (
                self._connection()
                .execute("SELECT reply, prompt_tokens, completion_tokens FROM replies WHERE key = ?", (key,))
                .fetchone()
            )
        except sqlite3.DatabaseError as err:  # damaged while the run went on
            raise JudgeCacheError(
                f"judge cache {self.path} cannot be read ({err}): {NEW_CACHE_HINT}"
            ) from err
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


__all__ = ["CachedReply", "JudgeCache", "JudgeCacheError", "cache_key"]
