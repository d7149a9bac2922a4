"""Input checks shared by every module: one clear error naming the parameter, its value and what is allowed.

All checks raise :class:`ValueError` (or :class:`TypeError` for a wrong type) with a message of the form
``"<name>=<value!r> is invalid: must be <allowed>"``, so a notebook run with a bad parameter fails fast
with a message that points at the parameter cell.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from splitlora.errors import InvalidParameterError


def _show(value) -> str:
    try:
        arr = np.asarray(value) if not isinstance(value, (str, bytes)) else None
    except (ValueError, TypeError):  # ragged nesting
        arr = None
    if arr is not None and arr.ndim > 0 and arr.size > 6:
        return f"<array of shape {arr.shape}>"
    if arr is not None and arr.ndim > 0 and arr.dtype.kind in "biuf":
        return repr(arr.item() if arr.size == 1 else arr.tolist())
    return repr(value)


def _fail(name: str, value, allowed: str, bad=None) -> InvalidParameterError:
    where = f" (offending value {bad!r})" if bad is not None else ""
    return InvalidParameterError(f"{name}={_show(value)} is invalid: must be {allowed}{where}")


def _first_bad(value, ok_mask):
    arr = np.asarray(value).reshape(-1)
    bad = np.flatnonzero(~np.asarray(ok_mask).reshape(-1))
    return arr[bad[0]].item() if arr.size > 6 and bad.size else None


def check_number(name: str, value) -> None:
    """Raise ValueError unless ``value`` is a real number or an array of them: not a string (``'0.5'``), a bool or
    None."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting
        raise _fail(name, value, "a real number or an array of real numbers") from None
    if arr.dtype.kind not in "iuf" and arr.size > 0:
        raise _fail(name, value, "a real number or an array of real numbers")


def check_finite(name: str, value) -> None:
    """Raise ValueError if ``value`` (scalar or array) is not numeric (:func:`check_number`) or holds NaN or +-inf."""
    check_number(name, value)
    arr = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(arr)):
        raise _fail(name, value, "finite (no NaN or inf)", _first_bad(arr, np.isfinite(arr)))


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """Raise ValueError unless every element of ``value`` is finite and > 0 (>= 0 with ``allow_zero``)."""
    check_finite(name, value)
    arr = np.asarray(value, dtype=float)
    ok = (arr >= 0) if allow_zero else (arr > 0)
    if not np.all(ok):
        raise _fail(name, value, ">= 0" if allow_zero else "> 0", _first_bad(arr, ok))


def check_range(name: str, value, lo: float, hi: float) -> None:
    """Raise ValueError unless every element of ``value`` is numeric, finite and in the closed interval [lo, hi]."""
    check_number(name, value)
    arr = np.asarray(value, dtype=float)
    ok = np.isfinite(arr) & (arr >= lo) & (arr <= hi)
    if not np.all(ok):
        raise _fail(name, value, f"in [{lo}, {hi}] (finite)", _first_bad(arr, ok))


def check_int_range(name: str, value, lo: int, hi: int) -> None:
    """Raise ValueError unless every element of ``value`` is an integer in [lo, hi]."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            pass
        else:
            raise _fail(name, value, f"an integer in [{lo}, {hi}]")
    ok = (arr >= lo) & (arr <= hi)
    if not np.all(ok):
        raise _fail(name, value, f"an integer in [{lo}, {hi}]", _first_bad(arr, ok))


def check_choice(name: str, value, allowed: Iterable) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise _fail(name, value, f"one of {allowed}")


def check_order(lo_name: str, lo, hi_name: str, hi) -> None:
    """Raise ValueError unless ``lo <= hi`` (both finite)."""
    check_finite(lo_name, lo)
    check_finite(hi_name, hi)
    if not lo <= hi:
        raise InvalidParameterError(f"{lo_name}={lo!r} is invalid: must be <= {hi_name}={hi!r}")


def is_nan(x) -> bool:
    """True if ``x`` is a float NaN."""
    return isinstance(x, float) and math.isnan(x)
