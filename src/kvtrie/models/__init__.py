"""Bundled reference models, live caches, sampler, generation loop and tokenizers."""

from .cache import KVCache, RecurrentCache
from .fingerprint import model_fingerprint
from .generate import Generation, GenerationResult, generate, greedy, stream_generate
from .load import load_model, save_model
from .sampler import Sampler
from .tokenizer import ByteTokenizer, ChatTemplate, Conversation, HFTokenizer, StreamingDetokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "ChatTemplate",
    "Conversation",
    "Generation",
    "GenerationResult",
    "HFTokenizer",
    "KVCache",
    "RecurrentCache",
    "Sampler",
    "StreamingDetokenizer",
    "generate",
    "greedy",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "save_model",
    "stream_generate",
]
