"""kvtrie: a prefix-trie KV cache for MLX inference servers."""

__version__ = "0.2.0"

from .cache import PrefixCache
from .session import Session
from .errors import CacheMismatchError, PinError, SessionError, UnsafeDirectoryError
from .trie import Trie

__all__ = ["PrefixCache", "Session", "Trie", "SessionError", "CacheMismatchError", "PinError", "UnsafeDirectoryError"]
