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


def test_dir_lists_the_lazy_names():
    names = dir(splitlora)
    assert {"SplitTrainer", "DeviceHalf", "RunPlan", "emulated_training", "card", "Scenario"} <= set(names)


def test_every_package_error_derives_from_the_base_error():
    from splitlora.distributed.roles import JoinRefused
    from splitlora.distributed.wire import ProtocolError
    from splitlora.emulation.emulators import DeviceMemoryError
    from splitlora.errors import InvalidParameterError, SplitLoRAError
    from splitlora.gpu import GPUBackendError

    for cls, builtin in ((InvalidParameterError, ValueError), (ProtocolError, RuntimeError),
                         (GPUBackendError, RuntimeError), (JoinRefused, ValueError),
                         (DeviceMemoryError, ValueError)):
        assert issubclass(cls, SplitLoRAError) and issubclass(cls, builtin), cls
    try:
        splitlora.Scenario(w=2)
    except SplitLoRAError as err:
        assert "w=2" in str(err) and "must be in [0.0, 1.0]" in str(err)
    else:
        raise AssertionError("expected an error for w=2")


def test_config_dataclasses_document_every_field():
    """Each field of a configuration dataclass is described in its class docstring."""
    import dataclasses
    import re

    from splitlora.distributed.config import DistConfig, LinkConfig, RunConfig
    from splitlora.model.system import CostModel, Workload
    from splitlora.training.trainer import SplitTrainConfig

    for cls in (splitlora.Scenario, Workload, CostModel, SplitTrainConfig, RunConfig, LinkConfig, DistConfig):
        doc = inspect.getdoc(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not re.search(rf"\b{f.name}\b", doc)]
        assert not missing, f"{cls.__name__} does not document {missing}"
