"""The flat public API: every exported name resolves, import stays light, public names are documented."""
from __future__ import annotations

import inspect
import subprocess
import sys

import splitlora


def test_every_exported_name_resolves_and_is_documented():
    for name in splitlora.__all__:
        obj = getattr(splitlora, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"splitlora.{name} has no docstring"


def test_import_does_not_load_torch():
    code = "import sys, splitlora; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_unknown_attribute_raises():
    try:
        splitlora.no_such_thing
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("expected AttributeError")
