"""Files are replaced whole or not at all, with the mode a new file gets under the umask (not mkstemp's 0600)."""
from __future__ import annotations

import os
import stat

import pytest

from splitlora.atomic import atomic_save_folder, atomic_write


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "table.csv"
        atomic_write(target, lambda p: p.write_text("a,b\n1,2\n"))
        assert target.read_text() == "a,b\n1,2\n" and _mode(target) == 0o644

        def broken(p):
            p.write_text("half")
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            atomic_write(target, broken)
        assert target.read_text() == "a,b\n1,2\n"
        assert sorted(x.name for x in tmp_path.iterdir()) == ["table.csv"]  # no temporary file left
    finally:
        os.umask(old)


def test_atomic_save_folder_moves_every_file_and_keeps_the_old_on_error(tmp_path):
    old = os.umask(0o022)
    try:
        folder = tmp_path / "adapter"
        folder.mkdir()
        (folder / "keep.txt").write_text("other file")
        (folder / "adapter_config.json").write_text("old")

        def save(d):
            (d / "adapter_config.json").write_text("new")
            (d / "sub").mkdir()
            (d / "sub" / "weights.bin").write_bytes(b"\x00\x01")

        atomic_save_folder(folder, save)
        assert (folder / "adapter_config.json").read_text() == "new"
        assert (folder / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
        assert (folder / "keep.txt").read_text() == "other file"
        assert _mode(folder / "adapter_config.json") == 0o644

        def broken(d):
            (d / "adapter_config.json").write_text("half")
            raise RuntimeError("crashed while saving")

        with pytest.raises(RuntimeError, match="crashed"):
            atomic_save_folder(folder, broken)
        assert (folder / "adapter_config.json").read_text() == "new"
        assert sorted(x.name for x in tmp_path.iterdir()) == ["adapter"]  # the temporary folder is gone
    finally:
        os.umask(old)
