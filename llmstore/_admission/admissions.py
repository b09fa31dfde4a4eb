"""``store.admissions``: admit a request before the upstream call, settle it after.

Both are one unit each (``admit.py``, ``finish.py``): one thread hop on SQLite, one
transaction on Postgres. A refusal leaves nothing held or counted; an admission past its
expiry never blocks another (its holds are expired first when they are in the way), and
``expire()`` sweeps the rest.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Sequence
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from llmstore._access import TOKEN_PREFIX, check_token_secret
from llmstore._billing import check_api_key_secret, check_ttl, params_digest
from llmstore._core.errors import (
    ApiKeyRejectedError,
    ConflictError,
    TokenRejectedError,
    ValidationError,
)
from llmstore._core.secrets import SecretDigester
from llmstore._core.validate import MAX_INT64, check_id, check_int, check_optional_id, check_text
from llmstore._db.admission_schema import RATE_PERS, rate_limits, rate_windows
from llmstore._db.operations import ATTEMPTS, Clock, Repository, reads
from llmstore._db.queries import found
from llmstore._db.runner import Runner
from llmstore._usage import UsageRecord

from . import finish
from .admit import AdmitRequest, LapsedHolds, admit, load, replay
from .admit_statement import ADMIT_IN_ONE_STATEMENT, admit_params, admitted
from .periods import WINDOW
from .records import ADMISSION_COLUMNS, A, Admission, Settlement, check_label, check_tags
from .settle_statement import SETTLE_IN_ONE_STATEMENT, settle_params, settled


def _amount(value: object, what: str) -> int:
    return check_int(value, what, minimum=0, maximum=MAX_INT64)


class Admissions(Repository):
    """``store.admissions`` and ``tx.admissions``: the per-request pair, admit and settle."""

    def __init__(self, runner: Runner, clock: Clock | None, digester: SecretDigester) -> None:
        super().__init__(runner, clock)
        self._digester = digester

    async def admit(
        self,
        secret: str | None = None,
        *,
        api_key_id: uuid.UUID | str | None = None,
        token_id: uuid.UUID | str | None = None,
        project_id: uuid.UUID | str | None = None,
        end_user: str | None = None,
        tags: Sequence[str] = (),
        cost: int = 0,
        tokens: int = 0,
        ttl: dt.timedelta = dt.timedelta(minutes=15),
        idempotency_key: str | None = None,
    ) -> Admission:
        """Decide a request in one atomic step, or refuse it with nothing held or counted.

        With ``secret`` (an API key ``lsk_...`` or a token ``lst_...``) the caller is also
        authenticated, with the rejections of ``api_keys.authenticate`` and ``tokens.use``
        (the token's quota spends one request). Every rate limit and budget of the key,
        the token, their project, ``end_user`` and ``tags`` then applies: each rate
        limit's window must have room for one more request and ``tokens`` tokens, each
        budget's period for ``cost``, and the key for ``cost`` of its available balance.
        Raises ``RateLimitedError`` (``.retry_after``), ``BudgetExceededError``
        (``.remaining``, ``.resets_at``) or ``InsufficientBalanceError``. The admission's
        holds last ``ttl`` unless settled, released or extended; a retry with the same
        ``idempotency_key`` and arguments returns the same admission.
        """
        request = self._request(
            secret,
            api_key_id,
            token_id,
            project_id,
            end_user,
            tags,
            cost,
            tokens,
            ttl,
            idempotency_key,
        )
        if self._runner.one_statement_writes:
            decided = await self._admit_in_one_statement(request)
            if decided is not None:
                return decided
        for _ in range(ATTEMPTS):
            now = self.now()
            try:
                return await self._runner.write(functools.partial(admit, request=request, now=now))
            except LapsedHolds as lapsed:
                await self._runner.write(
                    functools.partial(
                        finish.expire_due,
                        now=now,
                        budget_id=lapsed.budget_id,
                        period_start=lapsed.period_start,
                    )
                )
            except ConflictError:
                if request.idempotency_key is None:
                    raise
                # A racing call with the same idempotency key wrote first: its admission.
                replayed = await self._runner.read(
                    functools.partial(
                        replay,
                        idempotency_key=request.idempotency_key,
                        digest=request.params_digest,
                        now=now,
                    )
                )
                if replayed is None:
                    raise
                return replayed
        raise ConflictError("expired admissions kept holding the budget; try again")

    async def _admit_in_one_statement(self, request: AdmitRequest) -> Admission | None:
        """The admission if the one-statement form could decide it (nearly always);
        None when it wrote nothing and the Python form must decide."""
        try:
            row = await self._runner.lean_first(
                ADMIT_IN_ONE_STATEMENT, admit_params(request, self.now())
            )
        except ConflictError:
            # A racing call with the same idempotency key wrote first: the statement was
            # undone whole, and the Python form replays that call's admission.
            return None
        return admitted(row)

    def _request(
        self,
        secret: object,
        api_key_id: object,
        token_id: object,
        project_id: object,
        end_user: object,
        tags: object,
        cost: object,
        tokens: object,
        ttl: object,
        idempotency_key: object,
    ) -> AdmitRequest:
        identities = sum(value is not None for value in (secret, api_key_id, token_id))
        if identities > 1:
            raise ValidationError("give at most one of secret, api_key_id=, token_id=")
        kind: Literal["key", "token"] | None = None
        digest = None
        if secret is not None:
            if isinstance(secret, str) and secret.startswith(TOKEN_PREFIX):
                kind = "token"
                try:
                    digest = self._digester.digest(check_token_secret(secret))
                except ValidationError:
                    raise TokenRejectedError("unknown") from None
            else:
                kind = "key"
                try:
                    digest = self._digester.digest(check_api_key_secret(secret))
                except ValidationError:
                    raise ApiKeyRejectedError("unknown") from None
        key_id = check_optional_id(api_key_id, "API key id")
        checked_token = check_optional_id(token_id, "token id")
        project = check_optional_id(project_id, "project id")
        user = None if end_user is None else check_label(end_user, "end user")
        checked_tags = check_tags(tags)
        amount = _amount(cost, "cost")
        estimate = _amount(tokens, "tokens")
        lifetime = check_ttl(ttl)
        idempotency = (
            None
            if idempotency_key is None
            else check_text(idempotency_key, "idempotency_key", max_length=200)
        )
        fingerprint = None
        if idempotency is not None:
            fingerprint = params_digest(
                "admit",
                digest,
                str(key_id),
                str(checked_token),
                str(project),
                user,
                list(checked_tags),
                amount,
                estimate,
                lifetime.total_seconds(),
            )
        return AdmitRequest(
            secret_kind=kind,
            secret_digest=digest,
            api_key_id=key_id,
            token_id=checked_token,
            project_id=project,
            end_user=user,
            tags=checked_tags,
            cost=amount,
            tokens=estimate,
            ttl=lifetime,
            idempotency_key=idempotency,
            params_digest=fingerprint,
        )

    async def settle(
        self,
        admission_id: uuid.UUID | str,
        cost: int | None = None,
        *,
        tokens: int | None = None,
        usage: UsageRecord | None = None,
    ) -> Settlement:
        """Charge the actual ``cost`` (0 for a failed call) to every budget and to the key
        (never below zero: what it cannot pay is the ``shortfall``), replace the token
        estimate by ``tokens``, and write ``usage``, all in one transaction, once.

        Without ``cost``, the cost is the usage's own, or else its cost at the price table
        (NotFoundError when there is no price): ``usage`` is then needed. A usage row
        without a cost of its own records the cost charged. The same call again returns
        the same settlement; another is a ``ConflictError``, as is settling a released or
        expired admission.
        """
        key = check_id(admission_id, "admission id")
        actual = None if cost is None else _amount(cost, "cost")
        counted = None if tokens is None else _amount(tokens, "tokens")
        if usage is not None and not isinstance(usage, UsageRecord):
            raise ValidationError(f"usage must be a UsageRecord, not {type(usage).__name__}")
        if actual is None and usage is None:
            raise ValidationError("settle needs a cost, or a usage record to take it from")
        digest = params_digest(
            "settle", actual, counted, None if usage is None else usage.model_dump(mode="json")
        )
        request = finish.SettleRequest(key, actual, counted, usage, digest)
        if actual is not None and usage is None and self._runner.one_statement_writes:
            params = settle_params(key, actual, counted, digest, self.now())
            decided = settled(
                await self._runner.lean_first(SETTLE_IN_ONE_STATEMENT, params), params
            )
            if decided is not None:
                return decided
        now = self.now()
        return await self._runner.write(functools.partial(finish.settle, request=request, now=now))

    async def release(self, admission_id: uuid.UUID | str) -> Admission:
        """Free the admission's holds and token estimate without charging anything (the
        request stays counted in its rate limits' windows)."""
        key = check_id(admission_id, "admission id")
        now = self.now()
        return await self._runner.write(
            functools.partial(finish.release, admission_id=key, now=now)
        )

    async def extend(self, admission_id: uuid.UUID | str, ttl: dt.timedelta) -> Admission:
        """Give an active admission ``ttl`` more from now; ConflictError once it is not."""
        key = check_id(admission_id, "admission id")
        lifetime = check_ttl(ttl)
        now = self.now()
        return await self._runner.write(
            functools.partial(finish.extend, admission_id=key, ttl=lifetime, now=now)
        )

    @reads(single=False)
    def get(self, conn: Connection, admission_id: uuid.UUID | str) -> Admission:
        """The admission with this id; NotFoundError if there is none."""
        key = check_id(admission_id, "admission id")
        row = found(conn, sa.select(*ADMISSION_COLUMNS).where(A.c.id == key), "admission", key)
        return load(conn, tuple(row))

    async def expire(self) -> int:
        """Expire every active admission past its time, in batches (safe from several
        replicas at once), and drop rate windows that have ended; how many expired."""
        now = self.now()
        total = 0
        while True:
            expired = await self._runner.write(functools.partial(finish.expire_due, now=now))
            total += expired
            if expired == 0 or self._runner.in_transaction:
                break
        await self._runner.write(functools.partial(_drop_ended_windows, now=now))
        return total


def _drop_ended_windows(conn: Connection, now: dt.datetime) -> None:
    for per in RATE_PERS:
        conn.execute(
            rate_windows.delete().where(
                rate_windows.c.rate_limit_id.in_(
                    sa.select(rate_limits.c.id).where(rate_limits.c.per == per)
                ),
                rate_windows.c.window_start < now - WINDOW[per],
            )
        )
