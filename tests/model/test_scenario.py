"""The scenario object, cached profile files, and the torch-free model configs."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from splitlora.model.hardware import load_devices, read_yaml
from splitlora.model.profile import MODELS_DIR, SHIPPED_MODELS, JsonModelConfig, load_model_config, profile_model
from splitlora.model.scenario import Scenario


def test_from_parameters_takes_the_fields_it_knows():
    params = {"model": "smollm2-135m", "w": 0.3, "steps_per_round": 4, "channel_state": "Poor", "smoke": True}
    sc = Scenario.from_parameters(params)
    assert (sc.model, sc.w, sc.steps_per_round) == ("smollm2-135m", 0.3, 4)
    assert Scenario.from_parameters({}) == Scenario()
    with pytest.raises(ValueError, match="steps_per_round=0"):
        Scenario.from_parameters({"steps_per_round": 0})


def test_yaml_is_parsed_once_per_file_version(tmp_path):
    from splitlora.paths import DATA_DIR

    path = tmp_path / "hardware.yaml"
    path.write_text((DATA_DIR / "hardware.yaml").read_text())
    first = read_yaml(path)
    assert read_yaml(path) is first
    assert list(load_devices(path)) == list(load_devices())
    text = path.read_text().replace('"Device 1":', '"Phone 1":', 1)
    time.sleep(0.01)
    path.write_text(text)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert read_yaml(path) is not first and "Phone 1" in load_devices(path)


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_json_config_profiles_equal_the_transformers_config(name):
    """Where transformers is missing, the shipped configs load as plain JSON and give the same profile."""
    plain, hf = JsonModelConfig.read(MODELS_DIR / SHIPPED_MODELS[name]), load_model_config(name)
    if hf.model_type == "t5":
        from splitlora.model.profile import t5_lora_minibatch_memory_bytes

        assert t5_lora_minibatch_memory_bytes(plain, batch_size=4, seq_len=128) == \
            t5_lora_minibatch_memory_bytes(hf, batch_size=4, seq_len=128)
        return
    for g in ("block", "sublayer"):
        a, b = (profile_model(c, batch_size=4, seq_len=512, granularity=g) for c in (plain, hf))
        for field in ("device_fwd_flops", "device_bwd_flops", "server_fwd_flops", "smashed_bytes",
                      "device_memory_bytes", "device_lora_params"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{name} {g} {field}")
        assert a.name == b.name == name


def test_precision_selects_the_sourced_peak():
    """fp32: 2 x CUDA cores x clock; fp16: the sourced FP16 peak; bf16: the FP16 peak only where BF16 units exist."""
    from splitlora.model.hardware import load_devices
    specs = load_devices()
    P32, _ = Scenario(precision="fp32").device_arrays()
    P16, _ = Scenario(precision="fp16").device_arrays()
    Pbf, _ = Scenario(precision="bf16").device_arrays()
    for i, d in enumerate(specs.values()):
        assert P32[i] == pytest.approx(0.4 * 2 * d.cuda_cores * d.gpu_max_clock_hz, rel=1e-12)
        assert P16[i] == pytest.approx(0.4 * d.fp16_peak_flops, rel=1e-12)
        assert Pbf[i] == (P16[i] if d.bf16_supported else P32[i])
    # Maxwell / Pascal boards: double-rate FP16 on CUDA cores (2 x the fp32 peak); Volta / Ampere: tensor cores (8 x)
    ratio = P16 / P32
    np.testing.assert_allclose(ratio[3:], 2.0, rtol=1e-3)
    assert np.all(ratio[:3] > 7.5)
    assert [d.bf16_supported for d in specs.values()] == [True, True, False, False, False]
    with pytest.raises(ValueError, match="precision='int8' is invalid"):
        Scenario(precision="int8")
