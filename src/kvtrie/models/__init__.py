"""Bundled reference models, live caches, sampler, generation loop and tokenizers."""

from .cache import KVCache, RecurrentCache
from .generate import Generation, GenerationResult, generate, greedy, stream_generate
from .fingerprint import model_fingerprint
from .load import load_model, save_model
from .sampler import Sampler
from .tokenizer import ByteTokenizer, ChatTemplate, Conversation, HFTokenizer, StreamingDetokenizer, load_tokenizer

__all__ = [
    "KVCache",
    "RecurrentCache",
    "Generation",
    "GenerationResult",
    "generate",
    "greedy",
    "stream_generate",
    "load_model",
    "model_fingerprint",
    "save_model",
    "Sampler",
    "ByteTokenizer",
    "ChatTemplate",
    "Conversation",
    "HFTokenizer",
    "StreamingDetokenizer",
    "load_tokenizer",
]
