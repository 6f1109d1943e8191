"""Where the ledger lives: a SQLite file (the embedded default) or a PostgreSQL server, both
through SQLAlchemy Core, so the ledger's SQL is written once with `:named` parameters and the
driver's dialect is SQLAlchemy's business, not ours.

This module is the one place the two backends differ:
- how a connection is opened (SQLite's pragmas; PostgreSQL's pool, pre-ping and timeouts);
- how a writer excludes other writers. SQLite: `BEGIN IMMEDIATE` takes the database's write lock
  up front. PostgreSQL: every transaction that spends a tenant's packages first locks that
  tenant's row (`SELECT … FOR UPDATE`, in id order, so two writers never deadlock), and the
  migration takes a transaction-scoped advisory lock;
- which errors mean "the database is not reachable now" (`unavailable`), as opposed to a bug.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, IntegrityError, OperationalError

from factory.metering.schema import LedgerError

# Any number of processes on any number of nodes may migrate at once: one does, the rest wait.
_MIGRATION_LOCK = 0x7F_AC_70_21
_TENANTS = sa.table("tenants", sa.column("id"), sa.column("name"))
# Built once, so SQLAlchemy compiles each once per dialect (FOR UPDATE on PostgreSQL, nothing on
# SQLite) and every call after is a cache hit.
_LOCK_BY_NAME = (
    sa.select(_TENANTS.c.id, _TENANTS.c.name)
    .where(_TENANTS.c.name.in_(sa.bindparam("names", expanding=True)))
    .order_by(_TENANTS.c.id)
    .with_for_update()
)
_LOCK_BY_ID = (
    sa.select(_TENANTS.c.id)
    .where(_TENANTS.c.id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(_TENANTS.c.id)
    .with_for_update()
)
_text = functools.lru_cache(maxsize=1024)(sa.text)  # parsing a statement's parameters once


def ledger_url(target: str | Path) -> URL:
    """A ledger location as a URL: `postgresql://user@host/db` (psycopg 3 is the driver),
    `sqlite:///path`, or a bare file path (SQLite)."""
    text = os.fspath(target)
    if "://" not in text:
        path = Path(text).expanduser().absolute()
        return URL.create("sqlite", database=str(path))
    try:
        url = sa.make_url(text)
    except ArgumentError:
        raise LedgerError(f"not a ledger URL: {describe_text(text)}") from None
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and url.database:
        return url.set(drivername="sqlite", database=str(Path(url.database).expanduser().absolute()))
    raise LedgerError(f"ledger URL must be postgresql://… or sqlite:///path, got {describe(url)}")


def describe(url: URL) -> str:
    """The URL fit for logs and messages: never its password."""
    return url.render_as_string(hide_password=True)


def describe_text(text: str) -> str:
    try:
        return describe(sa.make_url(text))
    except ArgumentError:
        return "(unparseable URL)"


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def open_engine(url: URL, *, pool_size: int = 5) -> Engine:
    if is_sqlite(url):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 10.0, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_connected)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=2 * pool_size,
        pool_timeout=10,
        connect_args={"connect_timeout": 5, "application_name": "factory-ledger"},
    )
    event.listen(engine, "checkout", _still_connected)
    return engine


def _still_connected(dbapi_conn, _record, _proxy) -> None:
    """A server restart leaves dead connections in the pool: hand none of them out. An idle
    connection has nothing to read unless the server has closed it (PostgreSQL says why, then
    hangs up), so a poll of its socket tells without a round trip; pool_pre_ping's `SELECT 1`
    would cost one per checkout, as much as a ledger function call itself. The pool drops a
    connection this refuses and opens a new one."""
    if dbapi_conn.closed or dbapi_conn.broken:
        raise DisconnectionError("connection closed")
    poller = select.poll()  # not select.select: a Ray worker may hold more than 1,024 descriptors
    poller.register(dbapi_conn.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    if poller.poll(0):
        raise DisconnectionError("the server closed the connection")


class Calls:
    """Calls of the ledger's PostgreSQL functions (procedures.py) straight through psycopg, on the
    ledger's pool. Each call is one statement in autocommit, so one round trip is the whole
    transaction (no BEGIN, no COMMIT). A connection found dead during a call (the server went
    away after the checkout's look) is dropped and the call sent once more on a new one. (If the
    server died after committing a reservation and before answering, the second try is refused
    as a duplicate request id and the first expires with its ttl: no token is lost or spent
    twice; a settlement is idempotent.)"""

    def __init__(self, engine: Engine):
        self.engine = engine

    def call(self, sql: str, args: tuple) -> list[tuple]:
        """The rows `sql` returns, committed."""
        for attempt in (1, 2):
            pooled = self.engine.raw_connection()
            conn = pooled.driver_connection
            try:
                conn.autocommit = True
                try:
                    cur = conn.execute(sql, args)
                    return cur.fetchall() if cur.description else []
                finally:
                    if not conn.broken:
                        conn.autocommit = False  # as the pool hands connections out
            except psycopg.OperationalError as err:
                if conn.broken:
                    pooled.invalidate(err)
                    if attempt == 1:
                        continue
                raise
            finally:
                pooled.close()
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def transaction(self, tenants: Iterable[str]) -> Iterator[Callable[[str, tuple], list[tuple]]]:
        """Several calls in one transaction, the named tenants' rows locked first in id order
        (as every writer locks them, so two transactions never wait on each other)."""
        pooled = self.engine.raw_connection()
        conn = pooled.driver_connection
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT id FROM tenants WHERE name = ANY(%s) ORDER BY id FOR UPDATE", (sorted(set(tenants)),)
                )
                yield lambda sql, args: conn.execute(sql, args).fetchall()
        except psycopg.OperationalError as err:
            if conn.broken:
                pooled.invalidate(err)
            raise
        finally:
            pooled.close()


def _sqlite_connected(dbapi_conn, _record) -> None:
    # isolation_level=None: we issue BEGIN ourselves (_sqlite_begin), so the driver never opens a
    # deferred transaction behind our back (under WAL one can fail to upgrade to a write).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 10000")
    if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        cur.execute("PRAGMA journal_mode = WAL")  # persistent: only the first opener pays for it
    cur.execute("PRAGMA synchronous = NORMAL")  # with WAL: a crash may lose the last commits, never corrupts
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    """Writers take the write lock up front (IMMEDIATE), so no other process can slip a write in
    between a transaction's reads and its writes."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ledger_write") else "BEGIN")


class Db:
    """An open transaction: plain SQL with `:named` parameters, the same text on both backends."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection):
        self.conn = conn

    def execute(self, sql: str, **params):
        return self.conn.execute(_text(sql), params)

    def lock_tenants(self, names: Iterable[str]) -> dict[str, int]:
        """Lock the named tenants' rows until the transaction ends (PostgreSQL; SQLite's write
        lock already excludes every other writer); their ids by name, unknown names left out.
        Every writer locks in id order, so two of them can never wait on each other."""
        names = sorted(set(names))
        if not names:
            return {}
        return {name: tenant_id for tenant_id, name in self.conn.execute(_LOCK_BY_NAME, {"names": names})}

    def lock_tenant_ids(self, ids: Iterable[int]) -> None:
        ids = sorted(set(ids))
        if ids:
            self.conn.execute(_LOCK_BY_ID, {"ids": ids}).fetchall()


@contextlib.contextmanager
def transaction(engine: Engine, write: bool) -> Iterator[Db]:
    """A write transaction, or a read. A read on PostgreSQL runs in autocommit: one round trip a
    statement, without BEGIN and COMMIT around it (a key's check, the hottest read, is a single
    statement). It sees what it saw before: under PostgreSQL's READ COMMITTED every statement
    of a transaction takes its own snapshot anyway."""
    with engine.connect() as conn:
        conn.execution_options(ledger_write=write)
        if not write and conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT")
        with conn.begin():
            yield Db(conn)


def reset_identities(db: Db, tables: Iterable[sa.Table]) -> None:
    """After rows were inserted with their ids (a migration), the next id PostgreSQL hands out
    must follow the largest (SQLite's INTEGER PRIMARY KEY already does)."""
    if db.conn.dialect.name != "postgresql":
        return
    for table in tables:
        db.execute(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), COALESCE(MAX(id), 0) + 1, false)"
            f" FROM {table.name}"
        )


def lock_for_migration(db: Db) -> None:
    if db.conn.dialect.name == "postgresql":
        db.execute("SELECT pg_advisory_xact_lock(:key)", key=_MIGRATION_LOCK)


def duplicate_key(err: IntegrityError) -> bool:
    """A UNIQUE or PRIMARY KEY refused the row (not a CHECK: that would be a bug of ours)."""
    orig = err.orig
    if getattr(orig, "sqlstate", None) == "23505":  # PostgreSQL's unique_violation
        return True
    return "UNIQUE constraint failed" in str(orig)  # SQLite's message for UNIQUE and PRIMARY KEY


def unavailable(err: BaseException) -> bool:
    """The database cannot be reached or went away (server down, restarting, network): worth a
    503 and a retry, not a 500. SQLite's "database is locked" after the busy timeout counts too."""
    if isinstance(err, OperationalError):
        return True
    return isinstance(err, DBAPIError) and err.connection_invalidated


def first_line(err: BaseException) -> str:
    """The database's own message, first line only: never SQLAlchemy's rendering of the statement
    and its parameters (which may hold a key's hash)."""
    cause = getattr(err, "orig", None) or err
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
