"""The PostgreSQL fixtures themselves: a real server, a fresh database per test, LISTEN/NOTIFY across connections."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(120)

_seen: list[str] = []


@pytest.mark.parametrize("round_", [0, 1])
def test_postgres_db_is_fresh_and_private(postgres_db, round_):
    import psycopg

    assert postgres_db not in _seen  # every test gets its own database ...
    _seen.append(postgres_db)
    with psycopg.connect(postgres_db) as conn:
        # ... and an empty one: the other round created the same table in its own database.
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO t VALUES (%s, %s)", (1, "ada"))
        conn.commit()
        assert conn.execute("SELECT id, name FROM t").fetchall() == [(1, "ada")]
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)


def test_listen_notify_round_trip(postgres_db):
    import psycopg

    if tuple(int(p) for p in psycopg.__version__.split(".")[:2]) < (3, 2):
        pytest.skip("Connection.notifies(timeout=...) needs psycopg >= 3.2")
    with psycopg.connect(postgres_db, autocommit=True) as listener, \
            psycopg.connect(postgres_db, autocommit=True) as notifier:
        listener.execute("LISTEN chan")
        notifier.execute("NOTIFY chan, 'x'")
        received = list(listener.notifies(timeout=5, stop_after=1))
    assert [(n.channel, n.payload) for n in received] == [("chan", "x")]
