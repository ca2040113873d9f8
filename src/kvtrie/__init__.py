"""kvtrie: a prefix-trie KV cache for MLX inference servers."""

__version__ = "0.2.0"

from .cache import PrefixCache
from .errors import CacheMismatchError, PinError, SessionError, UnsafeDirectoryError
from .session import Session
from .trie import Trie

__all__ = ["CacheMismatchError", "PinError", "PrefixCache", "Session", "SessionError", "Trie", "UnsafeDirectoryError"]
