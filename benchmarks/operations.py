"""The registry of benchmarked operations, by name, in the order they run.

To add an operation, write a class with three async methods ``llmstore``, ``raw`` and
``orm`` (the :class:`~benchmarks.common.Operation` protocol) in the ``ops_*`` module of its
domain, and add an instance here under the operation's name.
"""

from __future__ import annotations

from typing import Final

from .common import Operation
from .ops_access import ProjectsCreate, ProjectsGet, TokensUse
from .ops_admission import AdmissionsAdmitSettle
from .ops_billing import ApiKeysCharge, ApiKeysReserveSettle
from .ops_usage import UsageRecordMany

#: Operation name -> operation, in the order they run.
OPERATIONS: Final[dict[str, Operation]] = {
    "projects.create": ProjectsCreate(),
    "projects.get": ProjectsGet(),
    "tokens.use": TokensUse(),
    "api_keys.charge": ApiKeysCharge(),
    "api_keys.reserve_settle": ApiKeysReserveSettle(),
    "admissions.admit_settle": AdmissionsAdmitSettle(),
    "usage.record_many": UsageRecordMany(),
}
