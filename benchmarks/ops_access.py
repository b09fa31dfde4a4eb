"""The access operations: ``projects.create``, ``projects.get`` and ``tokens.use``, each
through llmstore, the raw driver and the ORM."""

from __future__ import annotations

import datetime as dt
import itertools
import secrets
from collections.abc import Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import joinedload

from .common import Context, OpCall, new_id, secret_digest, unique_names, utcnow
from .orm_models import OrmProject, OrmToken
from .raw_driver import RawDB

#: Rows that ``projects.get`` seeds; its timed calls cycle through their ids.
SEED_ROWS: Final = 300


def raw_insert_project(db: RawDB) -> str:
    columns = "id, name, api_key_encrypted, is_active, created_at, updated_at, deactivated_at"
    return f"INSERT INTO raw_projects ({columns}) VALUES ({db.placeholders(7)}) RETURNING *"


async def raw_create_project(db: RawDB, sql: str, name: str) -> Sequence[Any]:
    now = db.encode_time(utcnow())
    row = await db.fetchrow(sql, db.encode_id(new_id()), name, None, True, now, now, None)
    assert row is not None
    return row


class ProjectsCreate:
    description = "insert one project and return it"

    async def llmstore(self, ctx: Context) -> OpCall:
        names = unique_names("create-llmstore")
        projects = ctx.store.projects

        async def call() -> object:
            return await projects.create(next(names))

        return call

    async def raw(self, ctx: Context) -> OpCall:
        names = unique_names("create-raw")
        db = ctx.raw
        sql = raw_insert_project(db)

        async def call() -> object:
            return await raw_create_project(db, sql, next(names))

        return call

    async def orm(self, ctx: Context) -> OpCall:
        names = unique_names("create-orm")
        sessions = ctx.orm

        async def call() -> object:
            project = OrmProject(name=next(names))
            async with sessions() as session:
                session.add(project)
                await session.commit()
            return project

        return call


class ProjectsGet:
    description = f"fetch one project by id, cycling through {SEED_ROWS} seeded rows"

    async def llmstore(self, ctx: Context) -> OpCall:
        names = unique_names("get-llmstore")
        projects = ctx.store.projects
        ids = itertools.cycle([(await projects.create(next(names))).id for _ in range(SEED_ROWS)])

        async def call() -> object:
            return await projects.get(next(ids))

        return call

    async def raw(self, ctx: Context) -> OpCall:
        names = unique_names("get-raw")
        db = ctx.raw
        insert = raw_insert_project(db)
        seeded = [(await raw_create_project(db, insert, next(names)))[0] for _ in range(SEED_ROWS)]
        ids = itertools.cycle(seeded)
        sql = f"SELECT * FROM raw_projects WHERE id = {db.placeholder(1)}"

        async def call() -> object:
            row = await db.fetchrow(sql, next(ids))
            assert row is not None
            return row

        return call

    async def orm(self, ctx: Context) -> OpCall:
        names = unique_names("get-orm")
        sessions = ctx.orm
        seeded = [OrmProject(name=next(names)) for _ in range(SEED_ROWS)]
        async with sessions() as session:
            session.add_all(seeded)
            await session.commit()
        ids = itertools.cycle([project.id for project in seeded])

        async def call() -> object:
            async with sessions() as session:
                project = await session.get(OrmProject, next(ids))
            assert project is not None
            return project

        return call


def new_token_secret() -> str:
    """A secret shaped like llmstore's: ``lst_`` and 256 random bits, URL-safe base64."""
    return "lst_" + secrets.token_urlsafe(32)


class TokenRefused(Exception):
    """The ORM variant's refusal; never raised while benchmarking a usable token."""


def as_utc(value: dt.datetime) -> dt.datetime:
    # aiosqlite hands DateTime(timezone=True) back naive (stored as UTC); asyncpg, aware.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


#: The columns that ``tokens.use`` returns, in the order of llmstore's ``Token``.
TOKEN_COLUMNS: Final = (
    "id, project_id, name, prefix, expires_at, is_active, deactivated_at, "
    "request_count, max_requests, cache_hit_count, created_at, last_used_at"
)


class TokensUse:
    description = "spend one request of an unlimited token (checks and increment) and return it"

    async def llmstore(self, ctx: Context) -> OpCall:
        store = ctx.store
        project = await store.projects.create("tokens-use-llmstore")
        secret = (await store.tokens.create(project.id, max_requests=None)).secret
        tokens = store.tokens

        async def call() -> object:
            return await tokens.use(secret)

        return call

    async def raw(self, ctx: Context) -> OpCall:
        db = ctx.raw
        project = await raw_create_project(db, raw_insert_project(db), "tokens-use-raw")
        secret = new_token_secret()
        now = db.encode_time(utcnow())
        values = {
            "id": db.encode_id(new_id()),
            "project_id": project[0],
            "secret_digest": secret_digest(secret),
            "prefix": secret[:12],
            "name": None,
            "expires_at": None,
            "is_active": True,
            "deactivated_at": None,
            "request_count": 0,
            "max_requests": None,  # unlimited
            "cache_hit_count": 0,
            "created_at": now,
            "last_used_at": None,
        }
        insert = (
            f"INSERT INTO raw_tokens ({', '.join(values)})"
            f" VALUES ({db.placeholders(len(values))}) RETURNING id"
        )
        assert await db.fetchrow(insert, *values.values()) is not None
        # $1 is now (used twice), $2 the digest; SQLite's "?" are positional, so now is sent
        # twice there, as llmstore's compiled statement sends it.
        now_mark, digest_mark = db.placeholder(1), db.placeholder(2)
        sql = (
            f"UPDATE raw_tokens SET request_count = request_count + 1, last_used_at = {now_mark}"
            f" WHERE secret_digest = {digest_mark} AND {db.is_true('is_active')}"
            f" AND (expires_at IS NULL OR expires_at > {now_mark})"
            " AND (max_requests IS NULL OR request_count < max_requests)"
            " AND EXISTS (SELECT 1 FROM raw_projects WHERE raw_projects.id = raw_tokens.project_id"
            f" AND {db.is_true('raw_projects.is_active')})"
            f" RETURNING {TOKEN_COLUMNS}"
        )
        positional = ctx.driver == "sqlite"

        async def call() -> object:
            digest = secret_digest(secret)
            now = db.encode_time(utcnow())
            args = (now, digest, now) if positional else (now, digest)
            row = await db.fetchrow(sql, *args)
            assert row is not None
            return row

        return call

    async def orm(self, ctx: Context) -> OpCall:
        sessions = ctx.orm
        secret = new_token_secret()
        async with sessions() as session:
            project = OrmProject(name="tokens-use-orm")
            session.add(project)
            session.add(
                OrmToken(project=project, secret_digest=secret_digest(secret), prefix=secret[:12])
            )
            await session.commit()

        async def call() -> object:
            digest = secret_digest(secret)
            async with sessions() as session:
                token = await session.scalar(
                    sa.select(OrmToken)
                    .options(joinedload(OrmToken.project))
                    .where(OrmToken.secret_digest == digest)
                )
                now = utcnow()
                if token is None:
                    raise TokenRefused("unknown")
                if not token.is_active:
                    raise TokenRefused("inactive")
                if not token.project.is_active:
                    raise TokenRefused("project_inactive")
                if token.expires_at is not None and as_utc(token.expires_at) <= now:
                    raise TokenRefused("expired")
                if token.max_requests is not None and token.request_count >= token.max_requests:
                    raise TokenRefused("quota_exhausted")
                token.request_count += 1
                token.last_used_at = now
                await session.commit()
            return token

        return call
