"""The exceptions shotdb raises: one class per engine Status code, each carrying the engine's
message (which names the store, task, block, layer or file concerned)."""


class ShotdbError(Exception):
    """Base class of every error the engine reports."""


class NotFoundError(ShotdbError, KeyError):
    """No such store, task, block, demonstration or record."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptionError(ShotdbError):
    """Stored bytes failed a check (checksum, header, structure). Nothing damaged is returned."""


class InvalidArgumentError(ShotdbError, ValueError):
    """An argument is malformed or does not fit the task (shape, dtype, name, option)."""


class StoreIOError(ShotdbError, OSError):
    """The operating system or LMDB failed (disk full, permissions, read-only store)."""


class AlreadyExistsError(ShotdbError):
    """A task of that name exists."""


class NotSupportedError(ShotdbError, NotImplementedError):
    """A store or file version, or a feature, this build does not support."""


class FailedPreconditionError(ShotdbError):
    """The call does not fit the current state (another model's fingerprint, a closed store, live
    K/V handles)."""
