"""``search``: BM25 full-text search over the tenant's documents.

The index is SQLite FTS5 in one file per tool worker (``index_path``): it
survives restarts and remembers the last stream sequence it applied, so a
restarted worker only reads the documents published since. Documents arrive
on the ``BATON_DOCUMENTS`` stream (see ``documents.py``); a tenant only ever
searches its own rows (``tenant`` is a filter on every query, taken from the
call, never from the model's arguments).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

from proto.tools import BUILTIN_SPECS, SEARCH_PARAMETERS

from . import CallContext, ToolOutput

_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(
    title, body, tenant UNINDEXED, doc_id UNINDEXED, tokenize = 'porter unicode61'
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_WORD = re.compile(r"\w+", re.UNICODE)
MAX_HITS = SEARCH_PARAMETERS["properties"]["limit"]["maximum"]


def match_expression(query: str) -> str | None:
    """The user's words as an FTS5 query: each word quoted (so no FTS syntax
    from the model reaches SQLite), any of them may match; BM25 ranks."""
    words = _WORD.findall(query)[:32]
    return " OR ".join(f'"{w}"' for w in words) if words else None


class SearchIndex:
    """One SQLite FTS5 file. Calls are short and serialised by a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def last_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
        return int(row[0]) if row else 0

    def put(self, tenant: str, doc_id: str, title: str, body: str, seq: int) -> None:
        """Insert or replace a document and record ``seq`` as applied, atomically."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM docs WHERE tenant = ? AND doc_id = ?", (tenant, doc_id))
            self._db.execute(
                "INSERT INTO docs (title, body, tenant, doc_id) VALUES (?, ?, ?, ?)",
                (title, body, tenant, doc_id),
            )
            self._set_seq(seq)
            self._db.execute("COMMIT")

    def skip(self, seq: int) -> None:
        """Record ``seq`` as applied (a message that is not a document)."""
        with self._lock:
            self._set_seq(seq)

    def _set_seq(self, seq: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('last_seq', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value "
            "WHERE CAST(meta.value AS INTEGER) < CAST(excluded.value AS INTEGER)",
            (str(seq),),
        )

    def erase(self, tenant: str, doc_ids: set[str] | None = None) -> int:
        """Remove a tenant's documents (only ``doc_ids`` when given)."""
        with self._lock:
            if doc_ids is None:
                cur = self._db.execute("DELETE FROM docs WHERE tenant = ?", (tenant,))
            else:
                cur = self._db.executemany(
                    "DELETE FROM docs WHERE tenant = ? AND doc_id = ?",
                    [(tenant, d) for d in doc_ids],
                )
            return cur.rowcount

    def documents(self) -> set[tuple[str, str]]:
        with self._lock:
            return set(self._db.execute("SELECT tenant, doc_id FROM docs").fetchall())

    def count(self, tenant: str | None = None) -> int:
        with self._lock:
            if tenant is None:
                return int(self._db.execute("SELECT count(*) FROM docs").fetchone()[0])
            sql = "SELECT count(*) FROM docs WHERE tenant = ?"
            return int(self._db.execute(sql, (tenant,)).fetchone()[0])

    def search(self, tenant: str, query: str, limit: int = 5) -> list[dict[str, Any]]:
        """The tenant's best ``limit`` documents for ``query``, best first."""
        expr = match_expression(query)
        if expr is None:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT doc_id, title, snippet(docs, 1, '', '', ' … ', 24), bm25(docs) "
                "FROM docs WHERE docs MATCH ? AND tenant = ? ORDER BY bm25(docs) LIMIT ?",
                (expr, tenant, max(1, min(limit, MAX_HITS))),
            ).fetchall()
        return [
            {"doc_id": d, "title": t, "snippet": s, "score": round(-float(b), 4)}
            for d, t, s, b in rows
        ]


class SearchTool:
    name = "search"
    description = BUILTIN_SPECS["search"].description
    parameters: dict[str, Any] = SEARCH_PARAMETERS

    def __init__(self, index: SearchIndex, catch_up: Any = None) -> None:
        self.index = index
        self._catch_up = catch_up  # awaitable factory: index every document published so far

    async def run(self, args: dict[str, Any], ctx: CallContext) -> ToolOutput:
        if self._catch_up is not None:
            await self._catch_up()
        hits = self.index.search(ctx.tenant, args["query"], int(args.get("limit", 5)))
        return ToolOutput(json.dumps({"query": args["query"], "hits": hits}, ensure_ascii=False))
