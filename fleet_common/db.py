"""One engine per process, one session per unit of work.

``Database`` owns the engine and the session factory. ``Database.session()`` is the unit-of-work
boundary: it commits on success and rolls back on error; services only ``flush()``. Connection
failures surface as :class:`fleet_common.errors.DatabaseUnavailable` so callers answer 503
instead of hanging or crashing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import namedtuple
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from psycopg import RawCursor
from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Engine,
    MetaData,
    Select,
    TextClause,
    bindparam,
    column,
    create_engine,
    event,
    exc,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.engine.interfaces import BindTyping
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from fleet_common.errors import DatabaseUnavailable

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None or value.tzinfo is dt.UTC:  # PostgreSQL's, with TimeZone=UTC
            return value
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSONType}


def normalise_url(url: str) -> str:
    """Use psycopg 3 for every PostgreSQL URL."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(
    url: str, *, pool_size: int = 10, echo: bool = False, autocommit: bool = False
) -> Engine:
    """Build the process's engine: WAL + busy timeout + foreign keys on SQLite; fast failure
    on PostgreSQL (short connect timeout).

    No ``pool_pre_ping``: it costs a round trip on every checkout. A connection the server
    dropped fails its first statement instead; SQLAlchemy then invalidates the whole pool
    (every connection checked out before the failure is replaced), the request answers 503
    (:class:`DatabaseUnavailable`) and the next ones reconnect. ``autocommit`` (PostgreSQL):
    connections that run each statement in its own transaction (nothing to reset when they
    go back to the pool). The session time zone is UTC, as every stored time is: timestamps
    come back already in UTC."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False}
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=2,
        pool_recycle=1800,
        connect_args={
            "connect_timeout": 2,
            "options": "-c statement_timeout=15000 -c TimeZone=UTC",
        },
        **({"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None} if autocommit else {}),
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see "begin").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: the claim's read-then-update cannot race
        # another writer, and no transaction fails half-way with SQLITE_BUSY on upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def page_of(
    session: Session, query: Select[Any], order: Sequence[Any], page: int, page_size: int
) -> tuple[list[Any], int]:
    """One page of ``query`` in ``order`` and the total number of rows it matches."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    offset = (page - 1) * page_size
    if offset >= total:
        # Past the end (any page number is a valid request); also keeps an offset no database
        # integer can hold out of the SQL.
        return [], int(total)
    rows = session.scalars(query.order_by(*order).offset(offset).limit(page_size))
    return list(rows), int(total)


class Prebuilt:
    """A hot Core statement, compiled once per dialect into a textual one with the same
    parameters (types included) and typed result columns. SQLAlchemy hashes a statement's
    whole structure on every execution to find its compiled form; a textual statement's key
    is its SQL string, so the larger hot statements stop paying for their size."""

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        self._by_dialect: dict[str, Any] = {}
        self._on_driver: dict[str, _OnDriver] = {}

    def execute(self, session: Session, params: dict[str, Any]) -> Any:
        """Execute in ``session``'s transaction; the result's rows (on PostgreSQL a
        :class:`Rows` of named tuples, run by psycopg directly: see :class:`_OnDriver`)."""
        connection = session.connection()
        dialect = connection.dialect
        if dialect.driver != "psycopg":
            return connection.execute(self.on(dialect), params)
        driver = self._on_driver.get(dialect.name)
        if driver is None:
            driver = self._on_driver[dialect.name] = _OnDriver(self.on(dialect), dialect)
        return driver.execute(connection, params)

    def on(self, dialect: Dialect) -> Any:
        """The statement to execute on ``dialect``."""
        built = self._by_dialect.get(dialect.name)
        if built is None:
            built = self._by_dialect[dialect.name] = self._build(dialect)
        return built

    def _build(self, dialect: Dialect) -> Any:
        factory: Any = type(dialect)
        named = factory(paramstyle="named")  # ":name" placeholders, as text() takes
        named.bind_typing = BindTyping.NONE  # the casts are added when the text is compiled
        compiled = self.statement.compile(dialect=named)
        if compiled.post_compile_params or compiled.literal_execute_params:
            raise ValueError("Prebuilt: expanding or literal parameters are not supported")
        binds = {
            name: bindparam(name, value=param.value, type_=param.type)
            if param.value is not None
            else bindparam(name, type_=param.type)
            for param, name in compiled.bind_names.items()
        }
        # "::" (PostgreSQL casts) must not read as parameters.
        sql: TextClause = text(compiled.string.replace("::", "\\:\\:")).bindparams(*binds.values())
        return sql.columns(*(column(key, type_) for key, _, _, type_ in compiled._result_columns))


_REQUIRED = object()


class Rows(list[Any]):
    """A statement's rows, with the ``Result`` methods the callers of :class:`Prebuilt` use."""

    def first(self) -> Any:
        return self[0] if self else None

    def one(self) -> Any:
        if len(self) != 1:
            raise exc.NoResultFound("no row") if not self else exc.MultipleResultsFound("rows")
        return self[0]


class _OnDriver:
    """A prebuilt statement executed by the DBAPI driver itself, doing what SQLAlchemy's
    ``Connection.execute`` does for it and no more: the same SQL string (compiled once, casts
    included), each parameter through its type's bind processor, each result column through
    its type's result processor, and errors through the connection's own handler (wrapped
    in SQLAlchemy's exceptions; a disconnect invalidates the pool). SQLAlchemy's per-call
    machinery (execution context, cache lookup, result metadata) is most of a small
    statement's cost. No engine events run: none is installed on PostgreSQL."""

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if compiled.positional or compiled.escaped_bind_names or compiled.post_compile_params:
            raise ValueError("Prebuilt: the driver path takes named, plain parameters only")
        self.sql = compiled.string
        # psycopg's raw form ($1, $2...: no per-call parsing of the placeholders), one
        # number per name, as psycopg numbers a named query.
        numbers: dict[str, int] = {}

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "%"  # a literal "%" (doubled in the pyformat string)
            return f"${numbers.setdefault(name, len(numbers) + 1)}"

        self.raw_sql = re.sub(r"%%|%\((\w+)\)s", number, self.sql)
        processors = compiled._bind_processors
        params = {name: param for param, name in compiled.bind_names.items()}
        self.binds = [
            (
                name,
                _REQUIRED if params[name].required else params[name].value,
                processors.get(name),
            )
            for name in numbers  # in their numbers' order
        ]
        self.columns = [(key, type_) for key, _, _, type_ in compiled._result_columns]
        self.row: Any = namedtuple("Row", [key for key, _ in self.columns])  # type: ignore[misc]
        self.dialect = dialect
        self._results: list[Any] | None = None  # the result processors, at the first run

    def parameters(self, params: dict[str, Any]) -> list[Any]:
        values = []
        for name, default, process in self.binds:
            value = params.get(name, default)
            if value is _REQUIRED:
                raise exc.InvalidRequestError(f"A value is required for bind parameter {name!r}")
            values.append(value if process is None else process(value))
        return values

    def execute(self, connection: Connection, params: dict[str, Any]) -> Rows:
        values = self.parameters(params)
        cursor: Any = RawCursor(cast(Any, connection.connection.driver_connection))
        try:
            cursor.execute(self.raw_sql, values)
            rows = cursor.fetchall() if self.columns else []
            processors = self._results
            if processors is None:
                processors = self._results = self._processors(cursor.description or ())
        except self.dialect.loaded_dbapi.Error as error:
            connection._handle_dbapi_exception(error, self.sql, values, cursor, None)
        finally:
            cursor.close()
        make = self.row._make
        if not any(processors):
            return Rows(make(row) for row in rows)
        pairs = list(enumerate(processors))
        typed = [[row[i] if p is None else p(row[i]) for i, p in pairs] for row in rows]
        return Rows(make(row) for row in typed)

    def _processors(self, description: Sequence[Any]) -> list[Any]:
        if len(description) != len(self.columns):
            raise ValueError("Prebuilt: the driver returned other columns than compiled")
        return [
            type_._cached_result_processor(self.dialect, column[1])
            for (_, type_), column in zip(self.columns, description, strict=True)
        ]


class _Lean:
    """A Session to its callers, made only as far as they use it (PostgreSQL with psycopg).
    Work that is mostly Prebuilt statements only needs ``connection()``: one connection of
    the engine, checked out at the first use, in a transaction of its own (begun there, and
    again after a commit) unless the engine is the autocommit one. Anything else a Session
    does (ORM queries, ``execute``, ``info``...) makes a real one, from the same factory (its
    events included), bound to that connection and taking its transaction over: from then
    on the Session commits, rolls back and closes as usual. A Session's own setup, commit
    and close cost about as much as such a statement run by the driver."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Session], *, begin: bool) -> None:
        self._engine = engine
        self._sessions = sessions
        self._begin = begin
        self._connection: Connection | None = None
        self._session: Session | None = None

    def connection(self, *args: Any, **kwargs: Any) -> Connection:
        if self._session is not None:
            return self._session.connection(*args, **kwargs)
        connection = self._connection
        if connection is None:
            connection = self._connection = self._engine.connect()
        if self._begin and not connection.in_transaction():
            connection.begin()
        return connection

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine if self._session is None else self._session.get_bind(*args, **kwargs)

    @property
    def session(self) -> Session:
        if self._session is None:
            bind = self.connection()
            self._session = self._sessions(bind=bind, join_transaction_mode="control_fully")
        return self._session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def flush(self) -> None:
        if self._session is not None:
            self._session.flush()

    def commit(self) -> None:
        if self._session is not None:
            self._session.commit()
        elif self._connection is not None:
            if self._connection.in_transaction():
                self._connection.commit()
            self._release()

    def rollback(self) -> None:
        if self._session is not None:
            self._session.rollback()
        elif self._connection is not None:
            if self._connection.in_transaction():
                self._connection.rollback()
            self._release()

    def close(self) -> None:
        try:
            if self._session is not None:
                self._session.close()
        finally:
            if self._connection is not None:
                self._release()

    def _release(self) -> None:
        """Back to the pool (rolling back what is not committed), as a Session gives its
        connection back when its transaction ends: a caller that commits and then waits (the
        dequeue's long poll) holds none meanwhile; the next statement checks one out."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def has_orm(session: Session) -> bool:
    """Whether ``session`` is a real Session, or a :class:`_Lean` one that has made its own:
    objects can be added to it without making one."""
    return not isinstance(session, _Lean) or session._session is not None


class Database:
    """The engine and session factory of one process."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url, pool_size=pool_size, echo=echo)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # For work made of statements each atomic on its own: on PostgreSQL they run without
        # a transaction (no BEGIN and COMMIT round trips), on connections of their own (so no
        # connection switches its isolation level at every checkout); SQLite keeps its path.
        self._autocommit_engine: Engine | None = None
        self._autocommit = self.sessions
        if self.engine.dialect.name == "postgresql":
            self._autocommit_engine = make_engine(
                self.url, pool_size=pool_size, echo=echo, autocommit=True
            )
            self._autocommit = sessionmaker(self._autocommit_engine, expire_on_commit=False)

    @property
    def factories(self) -> tuple[sessionmaker[Session], ...]:
        """Every session factory of :meth:`session` (the autocommit one if it is apart)."""
        if self._autocommit is self.sessions:
            return (self.sessions,)
        return (self.sessions, self._autocommit)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self, *, autocommit: bool = False, lean: bool = False) -> Iterator[Session]:
        """A unit of work: commit on success, roll back on any error. ``autocommit``: the
        caller promises statements that are each atomic and correct on their own (nothing to
        roll back), so PostgreSQL runs each in its own transaction without BEGIN/COMMIT.
        ``lean`` (and always with ``autocommit``): on PostgreSQL the Session is made only if
        something needs more of it than Prebuilt statements (see :class:`_Lean`)."""
        session: Session
        on_psycopg = self.engine.dialect.driver == "psycopg"
        if autocommit and self._autocommit_engine is not None and on_psycopg:
            session = cast(Session, _Lean(self._autocommit_engine, self._autocommit, begin=False))
        elif autocommit:
            session = self._autocommit()
        elif lean and on_psycopg:
            session = cast(Session, _Lean(self.engine, self.sessions, begin=True))
        else:
            session = self.sessions()
        try:
            yield session
            session.commit()
        except (exc.OperationalError, exc.InterfaceError) as error:
            session.rollback()
            if _is_disconnect(error):
                raise DatabaseUnavailable(str(error.orig or error)) from error
            raise
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> None:
        """Raise DatabaseUnavailable unless a trivial query succeeds."""
        with self.session() as session:
            session.connection().exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()
        if self._autocommit_engine is not None:
            self._autocommit_engine.dispose()


def _is_disconnect(error: exc.DBAPIError) -> bool:
    if error.connection_invalidated:
        return True
    text = str(error.orig or error).lower()
    markers = (
        "connection",
        "server closed",
        "could not connect",
        "terminating",
        "shutting down",
        "starting up",
        "timeout expired",
        "pool",
        "recovery mode",
        "no route",
    )
    return any(marker in text for marker in markers)
