"""Predicted vs measured per cut layer (issue 3, "Measuring what the model predicts")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitlora.model.profile import profile_model
from splitlora.training.measure import (host_matmul_flops_per_s, measure_and_predict, measure_split_profile,
                                        predicted_vs_measured)
from splitlora.training.models import tiny_llama_config

#: Counted device memory (weights + LoRA state + saved activations) against profile.device_memory_bytes: the
#: profile leaves out O(B s) and O(s head_dim) tensors (RMSNorm rsqrt, rotary cos/sin, int64 labels), 1.4% at
#: most on these tiny models (0.4% at H = 128); 3% still catches a missed [B s H] tensor per block.
MEM_RTOL = 0.03
B, S = 2, 16


@pytest.fixture(scope="module")
def config():
    return tiny_llama_config(vocab_size=97, hidden_size=32, num_layers=3)


@pytest.mark.parametrize("granularity,wire", [("block", "float32"), ("sublayer", "bfloat16")])
def test_prediction_table_on_a_tiny_model(config, granularity, wire):
    df = measure_and_predict(config, granularity=granularity, batch_size=B, seq_len=S, wire_dtype=wire,
                             repeats=1, warmup=0)
    L = 3 if granularity == "block" else 6
    assert list(df["cut_layer"]) == list(range(L + 1))
    times = df[["device_time_s", "server_time_s", "total_time_s", "device_time_pred_s", "server_time_pred_s",
                "total_time_pred_s", "host_flops_per_s", "total_time_rel_err"]].to_numpy()
    assert np.isfinite(times).all() and (df["host_flops_per_s"] > 0).all()
    assert (df["device_time_s"] > 0).all() and (df["server_time_s"].iloc[:L] > 0).all()
    assert df["server_time_s"].iloc[L] == 0 and np.isnan(df["server_time_rel_err"].iloc[L])
    # calibrated once, on the unsplit step: the c = L row reproduces its own measurement
    assert df["host_flops_per_s"].nunique() == 1
    assert df["total_time_rel_err"].iloc[L] == pytest.approx(0.0, abs=1e-12)
    assert df["device_time_pred_s"].is_monotonic_increasing and df["server_time_pred_s"].is_monotonic_decreasing
    # device time at c = 0 is the embedding lookup: 0 FLOP in the profile
    assert df["device_time_pred_s"].iloc[0] == 0 and df["device_time_rel_err"].iloc[0] == -1
    wire_bytes = 4 if wire == "float32" else 2
    assert (df["smashed_bytes"].iloc[:L] == B * S * 32 * wire_bytes).all() and df["smashed_bytes"].iloc[L] == 0
    assert (df["smashed_bytes"] == df["smashed_pred_bytes"]).all()
    np.testing.assert_allclose(df["device_mem_pred_bytes"], df["device_mem_bytes"], rtol=MEM_RTOL)
    assert df["device_mem_rel_err"].abs().max() <= MEM_RTOL
    assert df["device_mem_bytes"].iloc[0] == 97 * 32 * 4  # c = 0: the fp32 embedding only


def test_given_host_flops_and_mismatched_profile(config):
    threads = torch.get_num_threads()
    measured = measure_split_profile(config, cuts=[0, 1], batch_size=B, seq_len=S, repeats=1, warmup=1,
                                     warmup_each_cut=False, clock="cpu", threads=1)
    assert torch.get_num_threads() == threads and (measured["clock"] == "cpu").all() and (measured["threads"] == 1).all()
    assert (measured["server_time_s"] > 0).all()
    prof = profile_model(config, batch_size=B, seq_len=S, param_bytes=4, activation_bytes=4, wire_bytes=4)
    with pytest.raises(ValueError, match="must include c = L = 3"):
        predicted_vs_measured(measured, prof)
    df = predicted_vs_measured(measured, prof, host_flops_per_s=1e9)
    assert (df["host_flops_per_s"] == 1e9).all() and (df["calibration"] == "given").all()
    assert df["server_time_pred_s"].iloc[0] == pytest.approx(prof.total_flops / 1e9)
    other = profile_model(config, batch_size=B, seq_len=2 * S, param_bytes=4, activation_bytes=4, wire_bytes=4)
    with pytest.raises(ValueError, match=r"measured seq_len=\[16\] is invalid"):
        predicted_vs_measured(measured, other, host_flops_per_s=1e9)
    with pytest.raises(ValueError, match="host_flops_per_s"):
        predicted_vs_measured(measured, prof, host_flops_per_s=0.0)
    with pytest.raises(ValueError, match="clock='gpu' is invalid"):
        measure_split_profile(config, cuts=[0], batch_size=B, seq_len=S, clock="gpu")


def test_host_matmul_flops():
    p = host_matmul_flops_per_s(n=64, repeats=2)
    assert np.isfinite(p) and p > 1e6
