"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class Lf2Error(Exception):
    """Base class for errors caused by bad input (file, key, URI); the message names the culprit."""


class DataError(Lf2Error):
    """A dataset root, image file or manifest is missing, unreadable or malformed."""


class StorageError(Lf2Error):
    """An object-store or file-system location cannot be read or written (missing bucket, denied...)."""


class CheckpointError(Lf2Error):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""
