"""The raw way on Postgres as llmstore goes outside a transaction: each admission and each
settlement first as one statement (:mod:`benchmarks.admission_cte_sql`), and, when that
wrote nothing (the first request of a rate window), the statement-by-statement flow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .admission_cte_sql import RAW_ADMIT_CTE, RAW_SETTLE_ADMISSION_CTE
from .admission_sql import settle_digest, window_start
from .common import new_id, secret_digest, utcnow
from .ops_billing import HOLD_TTL
from .raw_driver import RawDB

#: Where the admission's id is in the one statement's row (after its verdict).
ADMISSION_ID = 1


class RawAdmissionsInOneStatement:
    """``admit`` and ``settle`` as one statement each, else ``flow``'s transaction."""

    def __init__(self, db: RawDB, flow: Any, per: str) -> None:
        self.db = db
        self.flow = flow
        self.per = per
        self.admit_cte = db.sql(RAW_ADMIT_CTE)
        self.settle_cte = db.sql(RAW_SETTLE_ADMISSION_CTE)

    async def admit(self, secret: str, cost: int, tokens: int) -> object:
        """The admission's id."""
        now = utcnow()
        values = {
            "digest": secret_digest(secret),
            "now": now,
            "window_start": window_start(self.per, now),
            "tokens": tokens,
            "cost": cost,
            "reservation_id": new_id(),
            "admission_id": new_id(),
            "expires_at": now + HOLD_TTL,
        }
        row = await self.db.fetchrow(self.admit_cte.text, *self.admit_cte.args(values))
        if row is not None and row[0]:
            return row[ADMISSION_ID]
        admission: Sequence[Any] = await self.db.transaction(
            lambda: self.flow.admit(secret, cost, tokens)
        )
        return admission[0]

    async def settle(self, admission_id: object, cost: int, tokens: int) -> object:
        values = {
            "id": admission_id,
            "tokens": tokens,
            "cost": cost,
            "now": utcnow(),
            "digest": settle_digest(cost, tokens),
        }
        row = await self.db.fetchrow(self.settle_cte.text, *self.settle_cte.args(values))
        if row is not None and row[0]:
            return row
        return await self.db.transaction(lambda: self.flow.settle(admission_id, cost, tokens))
