"""Device, channel and server-clock emulation, energy-model calibration and the emulated training run.
Source: docs/split-training.md, "Emulated training"."""
