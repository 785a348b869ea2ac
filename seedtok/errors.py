"""Typed errors. Every user-facing failure is a `SeedtokError`; the CLI prints its message on one line
and exits non-zero, without a traceback."""


class SeedtokError(Exception):
    """Base class of every error seedtok raises on bad input."""


class ImageError(SeedtokError, ValueError):
    """An image could not be read or converted (missing, corrupt, unsupported)."""


class ImageTooLargeError(ImageError):
    """An image whose header claims more pixels than allowed (PIL's ``Image.MAX_IMAGE_PIXELS`` for files, the web
    app's ``max_pixels`` for uploads): refused before its pixels are decoded (decompression-bomb guard)."""


class CheckpointError(SeedtokError, ValueError):
    """A checkpoint is missing, of the wrong kind, or does not fit the model (shape mismatch)."""


class ConfigError(SeedtokError, ValueError):
    """A configuration or preset name is invalid."""


class IdsError(SeedtokError, ValueError):
    """Token ids are out of range, of the wrong count or not integers."""


class UnavailableError(SeedtokError):
    """An ability needs weights this install does not have (no image decoder, no LM); the message says which
    and how to get them."""
