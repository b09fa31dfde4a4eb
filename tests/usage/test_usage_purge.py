"""Usage retention: batched purges, the cutoff, exports to JSONL and CSV, failures, the CLI."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import functools
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from llmstore import (
    ExportError,
    LlmstoreError,
    Store,
    StoreConfig,
    UsageLog,
    UsageRecord,
    ValidationError,
)
from llmstore._cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from llmstore._cli.progress import PurgeProgress
from llmstore._db.schema import usage_logs
from llmstore._usage.purge import EXPORT_FIELDS, select_batch, select_batch_keys
from llmstore.migrations._commands import upgrade
from llmstore.pytest_plugin import run_sql
from tests.helpers import Terminal, count_rows

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)


async def _all(store: Store) -> list[UsageLog]:
    """Every row, oldest first (the order a purge deletes and exports them in)."""
    rows = await store.usage.list(limit=10_000)
    return sorted(rows, key=lambda row: (row.created_at, row.id))


async def _seed(
    store: Store, count: int, start: dt.datetime = T0, step: dt.timedelta = MINUTE
) -> None:
    records = [UsageRecord(created_at=start + i * step, model="m", cost=i) for i in range(count)]
    await store.usage.record_many(records)


def _full_record(i: int, created_at: dt.datetime) -> UsageRecord:
    """A row with every field set, text that CSV must quote, and a non-ASCII name."""
    return UsageRecord(
        created_at=created_at,
        api_key_id=uuid.uuid4(),
        project_id=uuid.uuid4(),
        token_id=uuid.uuid4(),
        request_id=f"req-{i}",
        alias="fast",
        profile="défaut",
        provider="openai",
        model=f"gpt-{i % 3}",
        origin="web",
        is_streaming=i % 2 == 0,
        success=i % 3 != 0,
        status_code=200 if i % 3 else 500,
        response_time_ms=100 + i,
        time_to_first_token_ms=10 + i,
        time_to_last_token_ms=90 + i,
        tokens_per_second=41.25 + i / 7,
        prompt_tokens=10 * i,
        completion_tokens=5 * i,
        cached_tokens=i,
        cost=1_000 + i,
        finish_reason="stop",
        max_tokens=256,
        temperature=0.7,
        top_p=0.9,
        message_count=i,
        error_type=None if i % 3 else "upstream",
        error_message=None if i % 3 else 'failed, "quoted"\nsecond line',
        metadata={"tier": "gold", "n": i, "tags": ["a", "b"]},
        cache_write_tokens=i,
        reasoning_tokens=i,
        audio_input_tokens=i,
        audio_output_tokens=i,
        end_user=f"user-{i % 2}",
        session_id='s,"1"',
        service_tier="default",
        tags=["a", f"t-{i}", 'with "quotes", commas'] if i % 2 else [],
        usage_source="estimated" if i % 3 else "reported",
    )


# -- deleting -----------------------------------------------------------------------------------


async def test_rows_before_the_cutoff_are_deleted_and_the_cutoff_itself_is_kept(
    store: Store,
) -> None:
    await _seed(store, 10)
    assert await store.usage.purge(T0 + 5 * MINUTE) == 5
    kept = await _all(store)
    assert [row.created_at for row in kept] == [T0 + i * MINUTE for i in range(5, 10)]
    assert await store.usage.purge(T0 + 5 * MINUTE) == 0
    # A cutoff in another zone is the same instant.
    paris = dt.timezone(dt.timedelta(hours=1))
    assert await store.usage.purge((T0 + 7 * MINUTE).astimezone(paris)) == 2
    assert await count_rows(store, usage_logs) == 3


async def test_a_timedelta_is_an_age_measured_from_now(store: Store) -> None:
    now = dt.datetime.now(dt.UTC)
    ages = [dt.timedelta(days=100), dt.timedelta(days=91), dt.timedelta(days=89), MINUTE]
    await store.usage.record_many([UsageRecord(created_at=now - age, cost=1) for age in ages])
    assert await store.usage.purge(dt.timedelta(days=90)) == 2
    assert await count_rows(store, usage_logs) == 2


async def test_a_purge_runs_in_batches_and_reports_progress(store: Store) -> None:
    await _seed(store, 25)
    seen: list[tuple[int, int]] = []
    deleted = await store.usage.purge(
        T0 + 100 * MINUTE, batch_size=10, progress=lambda d, b: seen.append((d, b))
    )
    assert deleted == 25
    assert seen == [(10, 1), (20, 2), (25, 3)]
    assert await count_rows(store, usage_logs) == 0

    # A last batch that is exactly full is followed by one that finds nothing.
    await _seed(store, 6)
    seen.clear()
    assert (
        await store.usage.purge(
            T0 + 100 * MINUTE, batch_size=3, progress=lambda d, b: seen.append((d, b))
        )
        == 6
    )
    assert seen == [(3, 1), (6, 2)]
    assert (
        await store.usage.purge(T0 + 100 * MINUTE, progress=lambda d, b: seen.append((d, b))) == 0
    )
    assert seen == [(3, 1), (6, 2)]


async def test_rows_sharing_a_timestamp_across_batches_are_all_deleted(store: Store) -> None:
    # The batches walk (created_at, id): ties on created_at are split by id.
    await _seed(store, 7, step=dt.timedelta(0))
    await _seed(store, 2, start=T0 + MINUTE)
    assert await store.usage.purge(T0 + MINUTE, batch_size=3) == 7
    assert [row.created_at for row in await _all(store)] == [T0 + MINUTE, T0 + 2 * MINUTE]


async def test_a_purge_inside_a_transaction_commits_or_rolls_back_with_it(store: Store) -> None:
    await _seed(store, 5)
    with pytest.raises(RuntimeError, match="abandon"):
        async with store.transaction() as tx:
            assert await tx.usage.purge(T0 + 10 * MINUTE, batch_size=2) == 5
            raise RuntimeError("abandon")
    assert await count_rows(store, usage_logs) == 5
    async with store.transaction() as tx:
        assert await tx.usage.purge(T0 + 10 * MINUTE, batch_size=2) == 5
    assert await count_rows(store, usage_logs) == 0


# -- exporting ----------------------------------------------------------------------------------


def test_exports_use_the_field_names_of_usage_log() -> None:
    assert tuple(UsageLog.model_fields) == EXPORT_FIELDS


def _read_jsonl(path: Path) -> list[UsageLog]:
    lines = path.read_text(encoding="utf-8").splitlines()
    objects = [json.loads(line) for line in lines]
    assert all(tuple(obj) == EXPORT_FIELDS for obj in objects)
    for obj in objects:
        assert obj["created_at"].endswith("Z")
    return [UsageLog.model_validate(obj) for obj in objects]


def _read_csv(path: Path) -> list[UsageLog]:
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = next(reader)
        assert tuple(header) == EXPORT_FIELDS
        logs = []
        for cells in reader:
            values: dict[str, Any] = {
                name: None if cell == "" else cell for name, cell in zip(header, cells, strict=True)
            }
            for name in ("is_streaming", "success"):
                assert values[name] in ("true", "false")
            if values["metadata"] is not None:
                values["metadata"] = json.loads(values["metadata"])
            values["tags"] = json.loads(values["tags"])
            logs.append(UsageLog.model_validate(values))
    return logs


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
async def test_the_export_holds_exactly_the_deleted_rows(
    store: Store, tmp_path: Path, suffix: str
) -> None:
    records = [_full_record(i, T0 + (i // 2) * MINUTE) for i in range(9)]
    records.append(UsageRecord(created_at=T0, cost=0))  # every optional field empty
    records.append(_full_record(99, T0 + 10 * MINUTE))  # after the cutoff: kept
    await store.usage.record_many(records)
    before = await _all(store)
    expected = [row for row in before if row.created_at < T0 + 10 * MINUTE]
    path = tmp_path / f"old{suffix}"
    deleted = await store.usage.purge(T0 + 10 * MINUTE, batch_size=3, export_to=str(path))
    assert deleted == len(expected) == 10
    exported = _read_jsonl(path) if suffix == ".jsonl" else _read_csv(path)
    assert exported == expected
    assert [row.request_id for row in await _all(store)] == ["req-99"]


async def test_an_export_is_created_even_when_nothing_is_old_enough(
    store: Store, tmp_path: Path
) -> None:
    await _seed(store, 2)
    assert await store.usage.purge(T0, export_to=tmp_path / "none.csv") == 0
    assert (tmp_path / "none.csv").read_bytes() == ",".join(EXPORT_FIELDS).encode() + b"\r\n"
    assert await store.usage.purge(T0, export_to=tmp_path / "none.jsonl") == 0
    assert (tmp_path / "none.jsonl").read_bytes() == b""


async def test_a_failed_export_write_deletes_nothing_of_its_batch(
    store: Store, tmp_path: Path
) -> None:
    await _seed(store, 10)
    path = tmp_path / "old.jsonl"
    moved = tmp_path / "first-batch.jsonl"

    def sabotage(deleted: int, batches: int) -> None:
        # After the first batch, a directory takes the file's place: the next write fails.
        path.rename(moved)
        path.mkdir()

    with pytest.raises(ExportError, match="could not write the usage export") as caught:
        await store.usage.purge(T0 + 100 * MINUTE, batch_size=4, export_to=path, progress=sabotage)
    assert isinstance(caught.value, LlmstoreError)
    assert "4 row(s) were exported and deleted before it" in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    remaining = await _all(store)
    assert [row.cost for row in remaining] == list(range(4, 10))
    assert [row.cost for row in _read_jsonl(moved)] == [0, 1, 2, 3]


async def test_an_export_that_cannot_be_created_deletes_nothing(
    store: Store, tmp_path: Path
) -> None:
    await _seed(store, 3)
    with pytest.raises(ValidationError, match="cannot create the export file"):
        await store.usage.purge(T0 + 100 * MINUTE, export_to=tmp_path / "missing" / "old.jsonl")
    existing = tmp_path / "existing.csv"
    existing.write_text("keep me")
    with pytest.raises(ValidationError, match="already exists"):
        await store.usage.purge(T0 + 100 * MINUTE, export_to=existing)
    assert existing.read_text() == "keep me"
    with pytest.raises(ValidationError, match=r"\.jsonl or \.csv"):
        await store.usage.purge(T0 + 100 * MINUTE, export_to=tmp_path / "old.json")
    assert not (tmp_path / "old.json").exists()
    assert await count_rows(store, usage_logs) == 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"older_than": dt.datetime(2026, 1, 1)}, "timezone-aware"),
        ({"older_than": "90d"}, "not str"),
        ({"older_than": None}, "not NoneType"),
        ({"older_than": 90}, "not int"),
        ({"older_than": dt.date(2026, 1, 1)}, "not date"),
        ({"older_than": dt.timedelta(0)}, "positive timedelta"),
        ({"older_than": -dt.timedelta(days=1)}, "positive timedelta"),
        ({"older_than": dt.timedelta(days=3_000_000)}, "before the year 1"),
        ({"older_than": dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2)))}, "range"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 100_001}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 10.0}, "batch_size"),
        ({"batch_size": "10"}, "batch_size"),
        ({"export_to": 5}, "export_to"),
        ({"export_to": ""}, "export_to"),
        ({"progress": "print"}, "progress"),
    ],
)
async def test_bad_arguments_raise_validation_error_before_anything_is_deleted(
    store: Store, arguments: dict[str, Any], message: str
) -> None:
    await _seed(store, 3)
    call: dict[str, Any] = {"older_than": T0 + 100 * MINUTE, **arguments}
    with pytest.raises(ValidationError, match=message):
        await store.usage.purge(**call)
    assert await count_rows(store, usage_logs) == 3


# -- sharing the database -------------------------------------------------------------------


async def test_writers_are_not_blocked_by_a_long_purge(store: Store) -> None:
    await _seed(store, 200)
    started = asyncio.Event()
    batches_done = 0
    written_after: list[int] = []

    def progress(deleted: int, batches: int) -> None:
        nonlocal batches_done
        batches_done = batches
        started.set()

    async def writer() -> None:
        await started.wait()
        for i in range(3):
            new = [
                UsageRecord(created_at=T0 + 2000 * MINUTE, request_id=f"new-{i}-{j}")
                for j in range(5)
            ]
            assert (await store.usage.record_many(new)).written == 5
            written_after.append(batches_done)

    deleted, _ = await asyncio.wait_for(
        asyncio.gather(
            store.usage.purge(T0 + 1000 * MINUTE, batch_size=2, progress=progress), writer()
        ),
        timeout=60,
    )
    assert deleted == 200
    # The writer's batches went in between the purge's, long before its 100th and last.
    assert len(written_after) == 3 and written_after[0] < 100
    assert await count_rows(store, usage_logs) == 15


def _explain(conn: Connection, statement: Any) -> str:
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
        return "\n".join(str(row[-1]) for row in rows)
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    if schema is not None:
        conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
    # On a table this small any plan is cheap: ask whether one reads the index in order.
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
        conn.exec_driver_sql(f"SET LOCAL {setting} = off")
    return "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {compiled}").all())


async def test_each_batch_reads_one_range_of_the_created_at_index(store: Store) -> None:
    # The failure to avoid: a purge that scans or sorts the whole table once per batch.
    await _seed(store, 20)
    after = (T0 + 3 * MINUTE, 4)
    for statement in (
        select_batch(T0 + 10 * MINUTE, after, 5),
        select_batch_keys(T0 + 10 * MINUTE, None, 5),
    ):
        plan = await run_sql(store, functools.partial(_explain, statement=statement))
        assert "llmstore_usage_logs_created_at_id_idx" in plan, plan
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan


# -- the command line ---------------------------------------------------------------------------


async def _seed_config(config: StoreConfig, ages: list[dt.timedelta]) -> None:
    await upgrade(config)
    now = dt.datetime.now(dt.UTC)
    async with Store(config) as store:
        records = [UsageRecord(created_at=now - age, cost=i) for i, age in enumerate(ages)]
        await store.usage.record_many(records)


async def _costs(config: StoreConfig) -> list[int]:
    async with Store(config) as store:
        return sorted(row.cost for row in await store.usage.list(limit=1000))


def test_cli_purge_exports_and_reports(
    schema_env: StoreConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ages = [dt.timedelta(days=days) for days in (400, 200, 120, 92, 30)] + [dt.timedelta(hours=1)]
    asyncio.run(_seed_config(schema_env, ages))
    url = ["--url", schema_env.url.get_secret_value()]
    export = tmp_path / "old.jsonl"
    args = ["usage", "purge", "--older-than", "13w", "--export", str(export), "--batch-size", "3"]
    assert main([*args, *url]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    # Not a terminal: a plain line per batch, then the total.
    assert out[:2] == ["purged 3 row(s) in 1 batch(es)", "purged 4 row(s) in 2 batch(es)"]
    assert out[2].startswith(f"{schema_env.masked_url}: purged 4 usage row(s) created before ")
    assert out[2].endswith(f", exported to {export}")
    assert sorted(row.cost for row in _read_jsonl(export)) == [0, 1, 2, 3]
    assert asyncio.run(_costs(schema_env)) == [4, 5]

    # The export file now exists: refused, one line, exit 1, nothing deleted.
    assert (
        main(["usage", "purge", "--older-than", "2h", "--export", str(export), *url]) == EXIT_FAILED
    )
    err = capsys.readouterr().err
    assert err.startswith("llmstore: error: export_to") and err.count("\n") == 1
    assert main(["usage", "purge", "--older-than", "12h", *url]) == EXIT_OK
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"{schema_env.masked_url}: purged 1 usage row(s) created before ")
    assert asyncio.run(_costs(schema_env)) == [5]

    # A cutoff before the year 1: one line, exit 1, nothing deleted.
    assert main(["usage", "purge", "--older-than", "3000000d", *url]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == "llmstore: error: older_than reaches back before the year 1\n"
    assert asyncio.run(_costs(schema_env)) == [5]


@pytest.mark.parametrize(
    "bad",
    [
        ["--older-than", "90"],
        ["--older-than", "0d"],
        ["--older-than", "3y"],
        ["--older-than", "90d", "--batch-size", "0"],
        [],
    ],
)
def test_cli_purge_refuses_bad_usage(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["usage", "purge", *bad, "--url", "sqlite://"])
    assert exited.value.code == EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_cli_progress_rewrites_one_line_on_a_terminal() -> None:
    terminal = Terminal()
    progress = PurgeProgress(terminal)
    progress(10_000, 1)
    progress(20_000, 2)
    progress.end()
    text = terminal.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "20,000 row(s) deleted in 2 batch(es)" in text
    quiet = Terminal()
    PurgeProgress(quiet).end()
    assert quiet.getvalue() == ""
