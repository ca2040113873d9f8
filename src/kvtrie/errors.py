"""kvtrie's exception types: one per failure class, all subclasses of ValueError."""


class SessionError(ValueError):
    """A session was used out of order: commit after close, commit twice, use after close."""


class CacheMismatchError(ValueError):
    """Live caches do not fit: another model's caches, wrong shapes/dtypes, or a wrong offset."""


class PinError(ValueError):
    """A pin was refused: the pinned bytes would pass a tier's budget."""


class UnsafeDirectoryError(ValueError):
    """A disk-tier directory other users could write to (they could plant records kvtrie would restore)."""
