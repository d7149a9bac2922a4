"""Writing files so that nothing already written is lost or half-overwritten: write a temporary file next to the
target, then rename it over the target (``os.replace`` is atomic on one file system); reading a checkpoint back
with an error that names the file when it is truncated or corrupt."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path`` (with the mode a
    newly created file gets under this process's umask, not ``mkstemp``'s 0600). Returns ``path``.

    Raises whatever ``write`` raises; the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint_file(path, map_location=None):
    """``torch.load(path, weights_only=True)``; a file that cannot be read back as one raises
    :class:`~splitlora.errors.CorruptFileError` (an OSError) naming the path, its size and what to do, instead of
    torch's ``OSError: [Errno 22] Invalid argument`` or ``PytorchStreamReader failed``. FileNotFoundError passes."""
    import pickle

    import torch

    from splitlora.errors import CorruptFileError

    path = Path(path)
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise CorruptFileError(f"checkpoint {str(path)!r} ({size} bytes) cannot be read: truncated or corrupt (a copy "
                               f"cut short, a full disk, or not a splitlora checkpoint): {type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]}. Move it away to start over, or put back a good "
                               "copy") from err


def atomic_save_folder(directory, save) -> Path:
    """Call ``save(tmp_dir)`` (e.g. a ``save_pretrained``) on a temporary folder next to ``directory``, then move
    each file it wrote into ``directory`` with :func:`atomic_write`'s rename, so every file there is either the
    old one or the new one, never half written. Returns ``directory``.

    Raises whatever ``save`` raises; then ``directory`` is left as it was.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.", dir=directory.parent) as tmp:
        save(Path(tmp))
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                dest = directory / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(f, _default_mode())
                os.replace(f, dest)
    return directory
