"""Test doubles for the GPU backends: a recording fake ``pynvml`` and a fake Jetson sysfs tree."""
