"""The package's errors: every error splitlora raises on purpose derives from :class:`SplitLoRAError`.

``except splitlora.SplitLoRAError`` catches them all; each also derives from the built-in type callers already
expect (``ValueError`` for bad input, ``RuntimeError`` for a failed operation), so existing handlers keep working.
The GPU backends' errors are in :mod:`splitlora.gpu.common`, the wire's in :mod:`splitlora.distributed.wire`.
"""


class SplitLoRAError(Exception):
    """Base of every error raised by splitlora."""


class CorruptFileError(SplitLoRAError, OSError):
    """A file splitlora wrote earlier (a checkpoint) cannot be read back: truncated or corrupt. The message names the
    path and what to do (:func:`splitlora.atomic.load_checkpoint_file`)."""


class InvalidParameterError(SplitLoRAError, ValueError):
    """A parameter is out of its allowed range or of the wrong kind. The message names the parameter, its value and
    what is allowed: ``"<name>=<value> is invalid: must be <allowed>"`` (:mod:`splitlora._validate`)."""
