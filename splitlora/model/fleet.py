"""Fleets of many edge devices drawn from the shipped device profiles (data/hardware.yaml).

A fleet is a tuple of profile names, usable as ``Scenario(devices=...)``. Source: docs/model.md, "Fleets".
"""
from __future__ import annotations

import numpy as np

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.model.hardware import load_hardware

MAX_FLEET = 10**6


def draw_fleet(num_devices: int, seed: int = 0, profiles=None, hardware=None) -> tuple:
    """``num_devices`` device profile names drawn uniformly with replacement (seeded), in draw order.

    Args:
        num_devices: M, 1..10^6; seed: numpy seed; profiles: names to draw from (default: every device of
            data/hardware.yaml, "Device 1".."Device 5"); hardware: a user hardware YAML merged over the shipped one.
    Returns:
        tuple of M names (each a key of :func:`splitlora.model.hardware.load_devices`).
    Raises:
        InvalidParameterError: num_devices out of range, an unknown or empty ``profiles``.
    """
    V.check_int_range("num_devices", num_devices, 1, MAX_FLEET)
    hw = load_hardware(hardware)
    known = list(hw.devices)
    if profiles is not None and (isinstance(profiles, str) or not list(profiles)):
        raise InvalidParameterError(f"profiles={profiles!r} is invalid: must name at least one of {known}")
    names = known if profiles is None else [hw.device_key(n, "profiles") for n in profiles]  # keys or boards
    idx = np.random.default_rng(seed).integers(0, len(names), int(num_devices))
    return tuple(names[i] for i in idx)
