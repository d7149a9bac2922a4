"""The researcher's own hardware: a user YAML merged over the shipped profiles, validated, and used by CARD."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from splitlora.errors import InvalidParameterError
from splitlora.model.card import card, exhaustive_search
from splitlora.model.hardware import load_hardware
from splitlora.model.scenario import Scenario
from splitlora.paths import DATA_DIR

USER = {
    "devices": {
        "Phone": {"board": "Pixel 9 NPU", "flops_per_s": {"value": 2.0e12, "unit": "FLOP/s", "source": "measured"},
                  "memory_bytes": 12e9, "memory_reserve_bytes": 4e9},
        "Device 5": {"memory_bytes": {"value": 8.0e9, "unit": "byte", "source": "the 8 GB module"}},
    },
    "servers": {"Lab GPU": {"board": "lab", "flops_per_cycle": 8192, "clocks_hz": [1.5e9, 0.5e9, 1.0e9],
                            "kappa": 2e-26, "memory_bytes": 24e9}},
}


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_hardware.yaml"
    path.write_text(yaml.safe_dump(USER))
    return path


def test_user_file_is_merged_over_the_shipped_profiles(user_file):
    shipped, hw = load_hardware(), load_hardware(user_file)
    assert list(hw.devices) == list(shipped.devices) + ["Phone"]
    assert hw.devices["Device 1"] == shipped.devices["Device 1"]
    nano = hw.device("Jetson Nano 4GB")  # a board name finds the profile
    assert nano.memory_bytes == 8.0e9 and nano.flops_per_s == shipped.devices["Device 5"].flops_per_s
    phone = hw.device("Pixel 9 NPU")
    assert (phone.flops_per_s, phone.training_memory_bytes) == (2.0e12, 8e9)
    assert phone.scaled(0.5).flops_per_s == 1.0e12
    lab = hw.server("Lab GPU")
    assert lab.clocks_hz == (0.5e9, 1.0e9, 1.5e9) and (lab.f_min_hz, lab.f_max_hz, lab.kappa) == (0.5e9, 1.5e9, 2e-26)
    assert hw.server() == shipped.server()  # the default server is unchanged


def test_second_shipped_server_from_its_datasheet_numbers():
    raw = yaml.safe_load((DATA_DIR / "hardware.yaml").read_text())["servers"]["A100 SXM4 80GB"]
    a100 = load_hardware().server("NVIDIA A100 SXM4 80GB")
    v = {k: e["value"] for k, e in raw.items()}
    clocks = np.arange(v["gpu_min_clock_hz"], v["gpu_max_clock_hz"] + 1, v["gpu_clock_step_hz"])
    np.testing.assert_allclose(a100.supported_clocks_hz(), clocks, rtol=1e-12)
    assert len(clocks) == 81
    assert a100.kappa == pytest.approx(v["board_power_w"] / v["gpu_max_clock_hz"] ** 3, rel=1e-12)
    assert a100.flops_per_cycle == 2 * v["cuda_cores"]


def test_scenario_with_user_hardware_is_what_card_plans_with(user_file):
    sc = Scenario(hardware=str(user_file), devices=("Phone", "Jetson Nano 4GB", "Device 1"), server="Lab GPU",
                  granularity="block")
    assert sc.devices == ("Phone", "Device 5", "Device 1")
    P, M = sc.device_arrays()
    assert P[0] == 2.0e12 and M[0] == 8e9 and M[1] == 8.0e9 - 1.5e9
    model = sc.cost_model()
    np.testing.assert_array_equal(model.clocks_hz, [0.5e9, 1.0e9, 1.5e9])
    assert model.kappa == 2e-26
    default = Scenario(granularity="block").cost_model()
    np.testing.assert_allclose(model.server_cycles * 8192, default.server_cycles * 2 * 4352, rtol=1e-12)
    R = np.full(3, 1e8)
    d = card(model, P, R, R, M, sc.w, discrete_clocks=True)
    e = exhaustive_search(model, P, R, R, M, sc.w, clocks_hz=model.clocks_hz)
    np.testing.assert_array_equal(d.cut_layer, e.cut_layer)
    np.testing.assert_allclose(d.objective, e.objective, rtol=1e-9)
    # the 8 GB Nano now holds cuts the 4 GB one cannot
    assert model.feasible(M)[1].sum() > Scenario(granularity="block").cost_model().feasible(
        Scenario(granularity="block").device_arrays(["Device 5"])[1])[0].sum()


@pytest.mark.parametrize("content,message", [
    ({"device": {}}, r"unknown sections \['device'\]"),
    ({"devices": {"X": {"memory_bytes": 1e9}}}, r"devices\['X'\] is incomplete: must give flops_per_s or "
                                                r"cuda_cores\+gpu_max_clock_hz"),
    ({"devices": {"X": {"flops_per_s": 1e12, "memory_bytes": -1}}}, r"devices\['X'\]\.memory_bytes=-1 is invalid: must be > 0"),
    ({"devices": {"X": {"flops_per_s": "fast", "memory_bytes": 1e9}}},
     r"devices\['X'\]\.flops_per_s='fast' is invalid: must be a number"),
    ({"devices": {"X": {"flops": 1e12, "memory_bytes": 1e9}}}, r"devices\['X'\] has unknown fields \['flops'\]"),
    ({"servers": {"S": {"clocks_hz": [1e9], "cuda_cores": 10}}}, r"servers\['S'\] is incomplete: must give kappa"),
    ({"servers": {"S": {"clocks_hz": [], "cuda_cores": 10, "kappa": 1e-26}}}, r"clocks_hz=\[\] is invalid"),
    ({"default_server": "nope"}, r"default_server='nope' is invalid: must be one of"),
])
def test_bad_user_hardware_is_refused_naming_the_field(tmp_path, content, message):
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(InvalidParameterError, match=message):
        load_hardware(path)


def test_missing_hardware_file_and_unknown_names(tmp_path):
    with pytest.raises(InvalidParameterError, match=r"hardware='.*nope\.yaml' is invalid: must be an existing YAML"):
        Scenario(hardware=str(tmp_path / "nope.yaml"))
    with pytest.raises(InvalidParameterError, match=r"server='H200' is invalid: must be one of \['RTX 4060 Ti 16GB'"):
        Scenario(server="H200")
    with pytest.raises(InvalidParameterError, match=r"devices='Device 1' is invalid: must be a list"):
        Scenario(devices="Device 1")


def test_sustained_flops_per_precision_from_the_user_file(tmp_path):
    path = tmp_path / "npu.yaml"
    path.write_text(yaml.safe_dump({"devices": {"NPU": {"flops_per_s": {"fp32": 1e12, "fp16": 4e12},
                                                        "memory_bytes": 8e9}}}))
    for precision, want in (("fp32", 1e12), ("fp16", 4e12)):
        P, _ = Scenario(hardware=str(path), devices=("NPU",), precision=precision).device_arrays()
        assert P[0] == want
    with pytest.raises(InvalidParameterError, match=r"precision='bf16' is invalid for NPU: its flops_per_s gives only"):
        Scenario(hardware=str(path), devices=("NPU",), precision="bf16")  # refused when the scenario is built
    path.write_text(yaml.safe_dump({"devices": {"NPU": {"flops_per_s": {"int8": 1e12}, "memory_bytes": 8e9}}}))
    with pytest.raises(InvalidParameterError, match=r"flops_per_s has precisions \['int8'\]: must be among"):
        load_hardware(path)


def test_a_user_power_field_replaces_the_shipped_ones_and_device_fields_are_checked(tmp_path):
    """A measured power given for a shipped server replaces its board power (it was silently ignored); utilisation,
    reserve, bf16_supported and cuda_cores of a device are checked with named errors."""
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump({"servers": {"RTX 4060 Ti 16GB": {"measured_power_w": 120.0,
                                                                     "measured_clock_hz": 2.0e9}}}))
    assert load_hardware(path).server().kappa == pytest.approx(120.0 / 2.0e9 ** 3, rel=1e-12)
    for entry, message in (({"utilisation": 7}, r"utilisation=7.* is invalid: must be in \[1e-06, 1.0\]"),
                           ({"memory_reserve_bytes": 9e9}, r"memory_reserve_bytes=9000000000.0 is invalid"),
                           ({"bf16_supported": "false"}, r"bf16_supported='false' is invalid: must be a YAML boolean"),
                           ({"cuda_cores": 3.7}, r"cuda_cores=3.7 is invalid: must be an integer")):
        path.write_text(yaml.safe_dump({"devices": {"Device 5": entry}}))
        with pytest.raises(InvalidParameterError, match=r"devices\['Device 5'\]\." + message):
            load_hardware(path)
