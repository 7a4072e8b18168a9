"""The screening state: which instances a model has screened, is screening, or left aside, and why.

One table row per (model, SOP instance): ``pending`` (found, not yet screened), ``claimed`` (a worker is on
it, until its lease runs out), ``done`` (with the UIDs of the report and overlay stored), ``failed`` (could
not be read or stored) or ``skipped`` (not an image this model takes), each with its reason. Rows hold UIDs,
states and reasons only: never a patient's name or ID, never pixels. A second table remembers how many
instances each study had at its last scan, so a watching screener re-reads only studies that changed.

It lives behind SQLAlchemy: a SQLite file for one machine (WAL journal; a claim is a ``BEGIN IMMEDIATE``
transaction, so two processes never take the same row) or any SQLAlchemy URL, such as a PostgreSQL database
that workers on several machines share (a claim is ``SELECT ... FOR UPDATE SKIP LOCKED``: workers take
different rows without waiting for each other). A claim is a lease: a worker that dies leaves its row
claimed until the lease expires, then another worker takes it; after :data:`MAX_ATTEMPTS` such takeovers
the instance is marked failed, so one poisonous image never blocks the queue.

Leases compare wall-clock times (seconds since the epoch) written by the workers: machines sharing one
database must keep their clocks in step (NTP), as hospital machines do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungscreen.errors import ConfigError, LungscreenError

#: A worker that died this many times on one instance (its lease expired each time) gives it up as failed.
MAX_ATTEMPTS = 3
#: Where the state lives when no --state is given.
DEFAULT_STATE = "lungscreen-pacs.db"
STATUSES = ("pending", "claimed", "done", "failed", "skipped")
#: The PostgreSQL advisory-lock key the table creation holds (any constant; "lungscre" as an int64).
SCHEMA_LOCK = int.from_bytes(b"lungscre", "big") >> 1


def state_url(given: str | None) -> str:
    """An SQLAlchemy URL from ``--state``: a URL as given (``postgresql://`` through psycopg 3), a file path as a
    SQLite URL; default ``lungscreen-pacs.db`` in the current folder. A PostgreSQL password belongs in
    ``~/.pgpass`` or ``$PGPASSWORD`` (libpq reads both), not in the URL on a command line."""
    text = given or DEFAULT_STATE
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if not path.parent.is_dir():
        raise ConfigError(f"--state: the folder {path.parent} does not exist (create it first)")
    return f"sqlite:///{path.resolve()}"


def worker_name() -> str:
    """This process as the state names it: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StateError(LungscreenError):
    """The state database could not be used (gone, locked for too long, out of space)."""


@dataclass(frozen=True)
class Found:
    """An instance a scan found, with its fate if it is decided before retrieval (``skipped`` and why)."""

    study: str
    series: str
    instance: str
    status: str = "pending"
    reason: str = ""


@dataclass(frozen=True)
class Claim:
    """An instance a worker holds until ``lease_until``; ``attempts`` counts the claims including this one."""

    model: str
    study: str
    series: str
    instance: str
    attempts: int


class State:
    """The state database at ``url`` (created on first use).

    Raises:
        ConfigError: a URL SQLAlchemy cannot use, or a database that cannot be reached.
    """

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        try:
            self.engine = sa.create_engine(url, **_engine_options(url))
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as error:
            raise ConfigError(f"--state: {_hidden(url)} is not a database URL SQLAlchemy can use ({error})") from None
        if self.engine.dialect.name == "sqlite":
            _immediate_transactions(self.engine)
        self.tables = _tables(sa)
        try:
            self._create_schema()
        except sa.exc.OperationalError as error:
            raise ConfigError(f"--state: cannot open {_hidden(url)} ({str(error.orig).splitlines()[0]})") from None

    def _create_schema(self) -> None:
        """The tables, once: on PostgreSQL, workers starting together would race on CREATE TABLE (one fails on
        the catalogue's unique index), so the creation holds a transaction-scoped advisory lock."""
        with self.engine.begin() as connection:
            if self.engine.dialect.name == "postgresql":
                connection.execute(self.sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
            self.tables["metadata"].create_all(connection)

    # ----- what the scan found ---------------------------------------------------------------------

    def register_model(self, sha256: str, name: str, version: str) -> None:
        self._insert_new(self.tables["models"], [{"sha256": sha256, "name": name, "version": version}])

    def add(self, model: str, found: Iterable[Found]) -> int:
        """Record instances not seen before (pending, or skipped with their reason); how many were new."""
        now = time.time()
        rows = [{"model": model, "sop_instance_uid": f.instance, "study_instance_uid": f.study,
                 "series_instance_uid": f.series, "status": f.status, "reason": f.reason, "updated": now}
                for f in found]
        return self._insert_new(self.tables["instances"], rows)

    def known(self, model: str, study: str) -> set[str]:
        table = self.tables["instances"]
        with self._opened() as connection:
            query = self.sa.select(table.c.sop_instance_uid).where(table.c.model == model,
                                                                   table.c.study_instance_uid == study)
            return set(connection.scalars(query))

    def study_size(self, model: str, study: str) -> int | None:
        """How many instances ``study`` had when it was last scanned for ``model`` (None: never scanned)."""
        table = self.tables["studies"]
        with self._opened() as connection:
            return connection.scalar(self.sa.select(table.c.instances).where(table.c.model == model,
                                                                             table.c.study_instance_uid == study))

    def scanned(self, model: str, study: str, instances: int) -> None:
        table, sa = self.tables["studies"], self.sa
        update = (sa.update(table).where(table.c.model == model, table.c.study_instance_uid == study)
                  .values(instances=instances, scanned=time.time()))
        try:
            with self._opened(write=True) as connection:
                if connection.execute(update).rowcount == 0:
                    connection.execute(sa.insert(table).values(model=model, study_instance_uid=study,
                                                               instances=instances, scanned=time.time()))
        except sa.exc.IntegrityError:  # another worker recorded the study between our update and insert
            with self._opened(write=True) as connection:
                connection.execute(update)

    # ----- the queue -------------------------------------------------------------------------------

    def claim(self, model: str, worker: str, lease: float) -> Claim | None:
        """Take one pending instance (or one whose lease expired) for ``lease`` seconds; None when none is left."""
        table, sa = self.tables["instances"], self.sa
        while True:
            now = time.time()
            with self._opened(write=True) as connection:
                free = sa.or_(table.c.status == "pending", sa.and_(table.c.status == "claimed", table.c.lease_until < now))
                row = connection.execute(
                    sa.select(table).where(table.c.model == model, free)
                    .order_by(table.c.lease_until, table.c.study_instance_uid, table.c.sop_instance_uid)
                    .limit(1).with_for_update(skip_locked=True)).first()
                if row is None:
                    return None
                key = (table.c.model == model) & (table.c.sop_instance_uid == row.sop_instance_uid)
                if row.status == "claimed" and row.attempts >= MAX_ATTEMPTS:
                    connection.execute(sa.update(table).where(key).values(
                        status="failed", updated=now, lease_until=0.0,
                        reason=f"gave up: the worker screening it stopped {row.attempts} times without finishing "
                               "(killed, or crashed on this instance)"))
                    continue
                connection.execute(sa.update(table).where(key).values(
                    status="claimed", worker=worker, lease_until=now + lease, attempts=row.attempts + 1, updated=now))
                return Claim(model, row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid,
                             row.attempts + 1)

    def finish(self, claim: Claim, status: str, reason: str = "", *, report: str = "", overlay: str = "") -> None:
        """Record the outcome of a claimed instance (``done`` with the stored UIDs, ``failed`` or ``skipped``)."""
        table, sa = self.tables["instances"], self.sa
        with self._opened(write=True) as connection:
            connection.execute(sa.update(table).where(
                table.c.model == claim.model, table.c.sop_instance_uid == claim.instance, table.c.status != "done")
                .values(status=status, reason=reason, report_uid=report, overlay_uid=overlay, lease_until=0.0,
                        updated=time.time()))

    def release(self, claim: Claim) -> None:
        """Give an instance back untouched (the PACS was unavailable): it is pending again, the try not counted."""
        table, sa = self.tables["instances"], self.sa
        with self._opened(write=True) as connection:
            connection.execute(sa.update(table).where(
                table.c.model == claim.model, table.c.sop_instance_uid == claim.instance, table.c.status == "claimed")
                .values(status="pending", lease_until=0.0, attempts=table.c.attempts - 1, updated=time.time()))

    # ----- what status shows -----------------------------------------------------------------------

    def counts(self, model: str | None = None) -> dict[str, dict[str, int]]:
        """{model sha256: {status: count}} (one model's only when given)."""
        table, sa = self.tables["instances"], self.sa
        query = sa.select(table.c.model, table.c.status, sa.func.count()).group_by(table.c.model, table.c.status)
        if model is not None:
            query = query.where(table.c.model == model)
        out: dict[str, dict[str, int]] = {}
        with self._opened() as connection:
            for sha, status, count in connection.execute(query):
                out.setdefault(sha, dict.fromkeys(STATUSES, 0))[status] = count
        return out

    def models(self) -> dict[str, tuple[str, str]]:
        table = self.tables["models"]
        with self._opened() as connection:
            return {row.sha256: (row.name, row.version) for row in connection.execute(self.sa.select(table))}

    def latest(self, statuses: Iterable[str], limit: int, model: str | None = None) -> list[dict[str, Any]]:
        """The most recently recorded instances in ``statuses``, newest first, with their reasons."""
        table, sa = self.tables["instances"], self.sa
        query = sa.select(table).where(table.c.status.in_(list(statuses))).order_by(table.c.updated.desc()).limit(limit)
        if model is not None:
            query = query.where(table.c.model == model)
        with self._opened() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def rows(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every instance row (tests and tools)."""
        table = self.tables["instances"]
        query = self.sa.select(table) if model is None else self.sa.select(table).where(table.c.model == model)
        with self._opened() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _opened(self, *, write: bool = False) -> Iterator[Any]:
        """A connection (a transaction when ``write``); a database that went away is one line, not a trace."""
        try:
            with (self.engine.begin() if write else self.engine.connect()) as connection:
                yield connection
        except self.sa.exc.OperationalError as error:
            raise StateError(f"the screening state {_hidden(str(self.engine.url))} is unavailable "
                             f"({str(error.orig).splitlines()[0]})") from None

    def _insert_new(self, table: Any, rows: list[dict[str, Any]]) -> int:
        """Insert the rows whose primary key is not there yet (concurrent scanners race harmlessly)."""
        if not rows:
            return 0
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            from importlib import import_module

            insert = import_module(f"sqlalchemy.dialects.{dialect}").insert
            added = 0
            with self._opened(write=True) as connection:
                key = next(iter(table.primary_key.columns))
                for start in range(0, len(rows), 100):  # the rows RETURNING gives back are the new ones
                    statement = insert(table).values(rows[start:start + 100]).on_conflict_do_nothing().returning(key)
                    added += len(connection.execute(statement).all())
            return added
        added = 0
        for row in rows:  # other databases: one row at a time, a duplicate key is someone else's insert
            try:
                with self._opened(write=True) as connection:
                    connection.execute(self.sa.insert(table), row)
                added += 1
            except self.sa.exc.IntegrityError:
                pass
        return added


def _tables(sa: Any) -> dict[str, Any]:
    metadata = sa.MetaData()
    uid = sa.String(64)
    instances = sa.Table(
        "pacs_instances", metadata,
        sa.Column("model", sa.String(64), primary_key=True),  # the model file's SHA-256
        sa.Column("sop_instance_uid", uid, primary_key=True),
        sa.Column("study_instance_uid", uid, nullable=False),
        sa.Column("series_instance_uid", uid, nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text, nullable=False, default=""),
        sa.Column("report_uid", uid, nullable=False, default=""),
        sa.Column("overlay_uid", uid, nullable=False, default=""),
        sa.Column("worker", sa.String(255), nullable=False, default=""),
        sa.Column("lease_until", sa.Float, nullable=False, default=0.0),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("updated", sa.Float, nullable=False),
        sa.Index("pacs_instances_queue", "model", "status", "lease_until"),
    )
    studies = sa.Table(
        "pacs_studies", metadata,
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", uid, primary_key=True),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("scanned", sa.Float, nullable=False),
    )
    models = sa.Table(
        "pacs_models", metadata,
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
    )
    return {"metadata": metadata, "instances": instances, "studies": studies, "models": models}


def _engine_options(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # seconds a writer waits for another's transaction
    return {"pool_pre_ping": True}


def _immediate_transactions(engine: Any) -> None:
    """SQLite: every transaction takes the write lock at BEGIN (``BEGIN IMMEDIATE``), so a claim's read and
    its update are one step no other process can split; WAL lets readers (status) go on meanwhile. (The
    recipe of SQLAlchemy's SQLite documentation: pysqlite's own transaction handling off.)"""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _hidden(url: str) -> str:
    """A database URL with its password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: say it as given, minus anything after '@'
        return url.split("@")[-1]
