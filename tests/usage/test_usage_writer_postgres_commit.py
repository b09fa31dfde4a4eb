"""The buffered usage writer on Postgres: a COMMIT that fails is retried, and a COMMIT
whose reply is lost writes no row twice (exactly-once delivery)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from llmstore import Store, WriterStats, generate_key
from llmstore.pytest_plugin import drop_schema, fresh_schema_name, run_sql
from tests.helpers import require_postgres
from tests.usage.writer_support import _assert_each_once, _markers, _rec, _recs, _until, _writer

# --- Postgres: a COMMIT that fails, and a COMMIT whose reply is lost ------------------------


@pytest.fixture
async def pg_url_and_schema() -> AsyncIterator[tuple[str, str]]:
    url = require_postgres()
    schema = fresh_schema_name()
    yield url, schema
    await drop_schema(url, schema)


@pytest.mark.postgres
async def test_postgres_a_batch_refused_at_commit_is_retried_once_recovered(
    pg_url_and_schema: tuple[str, str],
) -> None:
    url, schema = pg_url_and_schema
    records = _recs("at-commit", 60)
    async with Store.from_url(
        url, schema_name=schema, encryption_keys=generate_key(), auto_upgrade=True
    ) as store:
        # A deferred constraint trigger fails the COMMIT itself, after the rows went in.
        await run_sql(
            store,
            lambda conn: conn.exec_driver_sql(
                f'CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql '
                "AS $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$"
            ),
            write=True,
        )
        await run_sql(
            store,
            lambda conn: conn.exec_driver_sql(
                f'CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON "{schema}".llmstore_usage_logs '
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                f'EXECUTE FUNCTION "{schema}".refuse()'
            ),
            write=True,
        )
        async with _writer(store, max_batch=60, flush_interval=0.01) as w:
            for record in records:
                await w.put(record)
            await _until(lambda: w.stats.failed_attempts >= 2)
            assert await _markers(store) == Counter()
            await run_sql(
                store,
                lambda conn: conn.exec_driver_sql(
                    f'DROP TRIGGER refuse ON "{schema}".llmstore_usage_logs'
                ),
                write=True,
            )
        assert w.stats.written == 60
        assert w.stats.retried == 60
        await _assert_each_once(store, records)


class _LostCommitReply:
    """A TCP proxy to Postgres that, once armed, lets one COMMIT reach the server and then
    cuts the connection before its reply reaches the client: the rows are committed, but
    the client only sees the connection drop."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.armed = False
        self.cut = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        cutting = False

        async def upstream() -> None:
            nonlocal cutting
            while data := await client_r.read(65536):
                if self.armed and b"COMMIT" in data:
                    self.armed = False
                    cutting = True
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if cutting:  # the server has committed and replied: drop the reply
                    self.cut += 1
                    client_w.transport.abort()
                    server_w.close()
                    return
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            client_w.close()
            server_w.close()


@pytest.mark.postgres
async def test_postgres_a_lost_commit_reply_does_not_write_rows_twice(
    pg_url_and_schema: tuple[str, str],
) -> None:
    url, schema = pg_url_and_schema
    target = sa.make_url(url)
    proxy = _LostCommitReply(target.host or "127.0.0.1", target.port or 5432)
    port = await proxy.start()
    through_proxy = target.set(port=port).render_as_string(hide_password=False)
    # Rows without a request_id: nothing in the data itself would stop a second copy.
    records = [_rec(f"lost-ack-{i}") for i in range(40)]
    try:
        async with Store.from_url(
            through_proxy, schema_name=schema, encryption_keys=generate_key(), auto_upgrade=True
        ) as store:
            async with store.usage.writer(max_batch=40, flush_interval=3600) as w:
                proxy.armed = True
                for record in records:
                    await w.put(record)
                await _until(lambda: w.stats.pending == 0)
            assert proxy.cut == 1
            assert w.stats == WriterStats(
                pending=0,
                written=40,
                duplicates=0,
                retried=40,
                failed_attempts=1,
                batches=1,
                rejected=0,
            )
            await _assert_each_once(store, records)
    finally:
        await proxy.stop()
