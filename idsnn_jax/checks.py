"""Field checks shared by the frozen option dataclasses (`OptimizerOptions`, `LossOptions`,
`AugmentOptions`, `FitOptions`): one integer rule and one message format, in a module that
imports nothing from the package, so every layer can use it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool: the type every count and epoch option takes."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_fields(owner: Any, checks: Iterable[tuple[str, bool, str]]) -> None:
    """ValueError `name=value is invalid: expected ...` for the first failed (name, ok,
    expected) of `checks`, the value read from `owner`'s field `name`."""
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{name}={getattr(owner, name)!r} is invalid: expected {expected}")
