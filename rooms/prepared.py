"""Cursors for the statements every connection runs, kept parsed and planned by PostgreSQL.

Django binds parameters on the client on PostgreSQL, so the server parses and plans every
statement anew; for the statements of a connect, a room switch and a disconnect that was most of
PostgreSQL's work. The ORM keeps Django's client-side cursors (some of its queries cannot be
bound on the server); only the fixed statements written in SQL (`services`, `selectors`) go
through here.

Prepared statements are per database connection. A pooler in transaction mode must support
them (PgBouncer >= 1.21 with `max_prepared_statements`), or `CHAT_DB_PREPARE=0` turns them off.
"""

from typing import Any

import psycopg
from django.db import connection
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper


class _PreparingCursor(psycopg.Cursor):
    """Binds on the server and prepares every statement it runs on first use."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("prepare", True)
        return super().execute(query, params, **kwargs)


class _LoggedCursor(CursorDebugWrapper):
    """Logs what it runs under DEBUG and in tests that capture queries."""

    def execute(self, sql: str, params: Any = None) -> Any:
        # Django's own wrapper reads the statement back from psycopg, which keeps none for a
        # prepared statement: log the SQL as given, with its parameters.
        with self.debug_sql(sql, params):
            return CursorWrapper.execute(self, sql, params)


def _prepares() -> bool:
    """Whether this database connection keeps statements prepared (PostgreSQL, not turned off)."""
    if connection.vendor != "postgresql":
        return False
    connection.ensure_connection()
    # psycopg prepares nothing while prepare_threshold is None, which is Django's default;
    # settings set it unless CHAT_DB_PREPARE=0.
    return connection.connection.prepare_threshold is not None


def cursor() -> Any:
    """A cursor, as `connection.cursor()`, that prepares its statements where it can.

    Django's wrapper around it is kept: database errors arrive as Django's exceptions, and
    tests that capture queries see these statements too.
    """
    if not _prepares():
        return connection.cursor()
    connection.validate_thread_sharing()
    with connection.wrap_database_errors:
        raw = _PreparingCursor(connection.connection)
    if connection.queries_logged:
        return _LoggedCursor(raw, connection)
    return connection.make_cursor(raw)
