"""User-facing errors: each says what is wrong and what to do. The CLI prints them without a traceback."""


class PacError(Exception):
    """Base class for errors that are the user's to fix (bad input, missing files, wrong settings)."""


class DataError(PacError):
    """A dataset file or row is malformed; the message names the file and line."""


class ModelError(PacError):
    """A model cannot be loaded (unknown architecture, missing files, bad layer range)."""


class CacheError(PacError):
    """The activation cache cannot be used as asked (mismatched fingerprint, missing samples)."""


class CacheCorruptError(CacheError):
    """A cache shard failed its checksum or could not be parsed; it must be rebuilt, never trained on."""

    def __init__(self, message: str, shard: str):
        super().__init__(message)
        self.shard = shard
