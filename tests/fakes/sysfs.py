"""Build a fake Jetson sysfs tree (devfreq GPU node and INA3221 hwmon rails) under a temporary folder."""
from __future__ import annotations

from pathlib import Path


def make_jetson_sysfs(root: Path, *, node_name="17000000.ga10b",
                      freqs_hz=(306000000, 408000000, 510000000, 612000000, 714000000, 816000000),
                      min_hz=None, max_hz=None, cur_hz=None, rails=None, of_node_name=None) -> Path:
    """Create ``root/sys/class/devfreq/<node_name>`` with available_frequencies, cur/min/max_freq (Hz).

    ``rails`` maps an INA3221 label to (mV, mA); they go to an hwmon directory of the ina3221 driver.
    ``of_node_name`` writes ``device/of_node/name`` (for discovery by device-tree name).
    Returns the devfreq node directory.
    """
    node = Path(root) / "sys" / "class" / "devfreq" / node_name
    node.mkdir(parents=True)
    freqs = sorted(freqs_hz)
    (node / "available_frequencies").write_text(" ".join(str(f) for f in freqs) + "\n")
    (node / "min_freq").write_text(f"{min_hz or freqs[0]}\n")
    (node / "max_freq").write_text(f"{max_hz or freqs[-1]}\n")
    (node / "cur_freq").write_text(f"{cur_hz or max_hz or freqs[-1]}\n")
    if of_node_name is not None:
        (node / "device" / "of_node").mkdir(parents=True)
        (node / "device" / "of_node" / "name").write_text(of_node_name + "\x00")
    if rails:
        hw = Path(root) / "sys" / "bus" / "i2c" / "drivers" / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
        hw.mkdir(parents=True)
        for k, (label, (mv, ma)) in enumerate(rails.items(), start=1):
            (hw / f"in{k}_label").write_text(label + "\n")
            (hw / f"in{k}_input").write_text(f"{mv}\n")
            (hw / f"curr{k}_input").write_text(f"{ma}\n")
    return node
