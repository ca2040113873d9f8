"""kvtrie: a prefix-trie KV cache for MLX inference servers."""
