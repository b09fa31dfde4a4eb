"""``UNSET``: the default of an update's argument that was not given.

``None`` is a meaningful value for several fields (no expiry, no quota), so an update
tells "leave it" from "clear it" by this marker.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["UNSET", "Unset"]


class Unset(enum.Enum):
    """Marks an argument that was not given (``None`` can be a meaningful value)."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET
