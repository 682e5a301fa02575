"""The option dataclasses' shared field checks (idsnn_jax.checks)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from idsnn_jax.checks import check_fields, is_int


@pytest.mark.parametrize(
    "value,expected",
    [(3, True), (0, True), (np.int64(-2), True), (True, False), (3.0, False), ("3", False)],
)
def test_is_int_takes_integers_not_bools_or_floats(value, expected):
    assert is_int(value) is expected


@dataclasses.dataclass(frozen=True)
class _Options:
    epochs: int = 3
    rate: float = 0.1


def test_check_fields_names_the_first_failed_field_and_its_value():
    options = _Options(epochs=0, rate=-1.0)
    check_fields(options, [("epochs", True, "an integer >= 1")])  # nothing failed
    with pytest.raises(ValueError) as err:
        check_fields(
            options, [("epochs", options.epochs >= 1, "an integer >= 1"), ("rate", False, "> 0")]
        )
    assert str(err.value) == "epochs=0 is invalid: expected an integer >= 1"
