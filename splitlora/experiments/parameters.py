"""A notebook's parameters, checked after papermill's injection: unknown names refused, strings parsed.

Every notebook calls :func:`notebook_parameters` in the cell after its ``parameters`` cell. Source: README.md
"Notebooks and what they reproduce".
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from types import ModuleType
from typing import Mapping, MutableMapping

from splitlora.errors import InvalidParameterError
from splitlora.paths import NOTEBOOKS_DIR

#: Names IPython puts in a kernel's namespace (not parameters).
IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


def _code_cells(path: Path) -> list[dict]:
    try:
        cells = json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError) as err:
        raise InvalidParameterError(f"notebook={str(path)!r} is invalid: must be a readable .ipynb file ({err})") from None
    return [c for c in cells if c.get("cell_type") == "code"]


def _parse(source, where: str = "notebook") -> ast.Module:
    text = "".join(source) if isinstance(source, list) else source
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(("%", "!"))]  # IPython magics
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError as err:
        raise InvalidParameterError(f"{where} is invalid: a code cell does not parse (line {err.lineno}: {err.msg})") \
            from None


def _path(notebook: str | Path) -> Path:
    return Path(notebook) if str(notebook).endswith(".ipynb") else NOTEBOOKS_DIR / f"{notebook}.ipynb"


def declared_parameters(notebook: str | Path) -> dict:
    """{name: default} of the notebook's cell tagged ``parameters`` (defaults as Python literals).

    Args:
        notebook: a stem under ``notebooks/`` ("fig2_optimal_cut") or a path to an ``.ipynb`` file.
    Raises:
        InvalidParameterError: no such notebook, no tagged cell, or a default that is not a literal.
    """
    path = _path(notebook)
    tagged = [c for c in _code_cells(path) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise InvalidParameterError(f"notebook={str(path)!r} is invalid: must have a code cell tagged 'parameters'")
    out = {}
    for node in _parse(tagged[0]["source"], f"{path.name}'s parameters cell").body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                out[name] = ast.literal_eval(node.value)
            except ValueError:
                raise InvalidParameterError(f"{path.name}: parameter {name} has a default that is not a literal") from None
    return out


def _assigned_names(path: Path) -> set:
    names = set()
    for cell in _code_cells(path):
        for node in ast.walk(_parse(cell["source"], path.name)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


def _kind(default) -> str:
    if isinstance(default, bool):
        return "a boolean (True or False)"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (list, tuple)):
        kinds = {_kind(x) for x in default}
        return "a list" + (f" of {kinds.pop().split(' ', 1)[1]}s" if len(kinds) == 1 else "")
    return f"like {default!r}"


def _fits(value, default) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return False
        return not default or all(any(_fits(v, d) for d in default) for v in value)
    return isinstance(value, type(default))


def coerce_parameter(name: str, value, default):
    """``value`` as the type of ``default``: a string given for a list, number or boolean (papermill's ``-p`` passes
    strings) is parsed as YAML; raises :class:`InvalidParameterError` naming the parameter if it does not fit."""
    import yaml

    if isinstance(value, str) and default is None and value.lstrip().startswith(("[", "{")):
        try:  # a list given as a string for a parameter whose default is None (``cuts = None``)
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InvalidParameterError(f"{name}={value!r} is invalid: must be YAML (a list like [1, 2])") from None
    if isinstance(value, str) and not isinstance(default, str) and default is not None:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InvalidParameterError(f"{name}={value!r} is invalid: must be {_kind(default)}") from None
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
    if not _fits(value, default):
        raise InvalidParameterError(f"{name}={value!r} is invalid: must be {_kind(default)}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    return value


class NotebookParameters(Mapping):
    """The declared parameters of a notebook as a read-only live view of its namespace: ``dict(params)`` gives the
    values as they are when it is read (after a ``smoke`` cell shrank some), for provenance and
    :meth:`splitlora.model.scenario.Scenario.from_parameters`."""

    def __init__(self, names, namespace: Mapping):
        self._names, self._ns = tuple(n for n in names if n in namespace), namespace

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return self._ns[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def __repr__(self):
        return f"NotebookParameters({dict(self)!r})"


def notebook_parameters(notebook: str | Path, namespace: MutableMapping) -> NotebookParameters:
    """Check a notebook's parameters in its kernel (``namespace`` = ``globals()``) and return them.

    Unknown names (neither a declared parameter, nor a name the notebook assigns, nor IPython's) are refused, so a
    misspelt ``-p`` fails in the first cell; string values for non-string parameters are parsed (YAML) and written
    back into ``namespace``. Returns the declared parameters as a live view (:class:`NotebookParameters`).
    Raises:
        InvalidParameterError: an unknown parameter (listing the known ones) or a value of the wrong kind.
    """
    declared = declared_parameters(notebook)
    path = _path(notebook)
    ignored = IPYTHON_NAMES | _assigned_names(path)
    unknown = sorted(n for n, v in namespace.items() if n not in declared and n not in ignored
                     and not n.startswith("_") and not isinstance(v, ModuleType) and not callable(v))
    if unknown:
        raise InvalidParameterError(f"parameters={unknown!r} are invalid: {path.stem} takes only {sorted(declared)}")
    for name, default in declared.items():
        if name in namespace:
            namespace[name] = coerce_parameter(name, namespace[name], default)
    return NotebookParameters(declared, namespace)
