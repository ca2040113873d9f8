"""Helpers for HTTP tests of an OpenAI-compatible server (``mlx_lm.server``, ``kvtrie serve``).

A helper module for tests (it holds no tests):

* ``make_model_dir(path, arch)`` writes a tiny seeded float32 model in Hugging Face layout
  (config.json, model.safetensors, a trained byte-level BPE tokenizer.json with a ChatML
  chat template) that ``mlx_lm.load`` and ``mlx_lm.server --model`` accept.
* ``free_port()``, ``ServerProcess`` start and stop a server subprocess on loopback.
* ``chat``, ``cached_tokens``, ``prompt_tokens``, ``completion_ids`` send a greedy
  ``/v1/chat/completions`` request and read the answer.
* ``chat_tokens``, ``stored_after``, ``oracle_cached`` compute what a perfect prefix cache
  would reuse, to compare with ``usage.prompt_tokens_details.cached_tokens``.

What mlx_lm.server (0.32) stores, read from mlx_lm/server.py, generate.py, models/cache.py
------------------------------------------------------------------------------------------
Prompt ids: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
tools=..., tokenize=True)`` on the TokenizerWrapper (``chat_tokens`` reproduces it).

Single-request path (``_serve_single``; taken when the request has a ``seed``, with
``--kv-bits``, with a draft model, or with images): ``cache_key = prompt[:]`` and every
token ``stream_generate`` yields is appended, *including the last one* (the stop token
``<|im_end|>`` when finish_reason is "stop", the max_tokens-th token when "length").
The KV state holds exactly those tokens: ``generate_step`` feeds token n to the model
before it yields token n. After the request ``insert_cache(key=prompt + generated)``.

Batched path (``BatchGenerator``; the default whenever every layer cache has ``merge``,
which includes llama's KVCache and qwen3_next's ArraysCache+KVCache): at the end the
server inserts ``r.all_tokens`` = prompt + all generated tokens, stop token included
(``GenerationBatch._step`` appends a token to ``tokens`` when it feeds it to the model,
and a finished sequence's last token has been fed). Before that, while prefilling, it
inserts checkpoints at segment ends (``batched_checkpoints``): ``insert_segments`` splits
the last prompt token off into its own segment, so ``prompt[:-1]`` is stored (type
"user" for chats, "assistant" otherwise) unless only one token was uncached; and for a
chat whose last message is a user message and which starts with system message(s),
``prompt[:system_end(...)]`` (the system turns + ``<|im_start|>user\n``) unless that
segment was fully cached.

So ``stored_after(prompt, completion) == prompt + completion`` on both paths, plus the
batched checkpoints. For a trimmable cache (all KVCache, e.g. llama) ``insert_cache``
drops every stored proper prefix of the new key (so the checkpoints vanish again).

Lookup (``LRUPromptCache.fetch_nearest_cache``): exact stored key -> everything cached
(``cached_tokens == len(prompt)``, a case the ``len(prompt) - 1`` cap below ignores);
else if some stored key diverges from the prompt *after* the deepest stored proper
prefix and the cache is trimmable: ``cached = min(common_prefix, len(prompt) - 1)``;
else the deepest stored key that is a proper prefix of the prompt (length >= 2):
``cached = len(that key)``. A non-trimmable cache (any ArraysCache layer: qwen3_next's
gated delta-net) can only reuse stored keys that are whole prefixes of the new prompt,
so ``oracle_cached`` (an ideal trie with unlimited memory) is an upper bound there,
and ``oracle_cached_untrimmable`` is the mlx_lm.server rule (in practice: the previous
turn's ``prompt[:-1]`` checkpoint). The LRU keeps at most ``--prompt-cache-size``
(default 10) entries, so pass a large one when comparing with an oracle. Requests
that overlap in time see each other's entries in arrival order, so compare concurrent
clients only with disjoint prompts or with bounds.

mlx_lm.server bug: on a non-trimmable model, a batched request whose prompt equals a
stored key exactly (e.g. a /v1/completions prompt that is an earlier prompt minus its
last token) gets ``rest == []``, ``insert_segments`` raises "empty prompt" in the
generation thread, the thread dies, the request's connection drops, and /health answers
503 from then on while the process stays up.

Recovering completion ids: re-tokenizing the reply text is NOT reliable (BPE merges
across token boundaries, the stop token is stripped from the text, the BPE streaming
detokenizer drops a leading space, invalid UTF-8 bytes become U+FFFD). Ask for
``logprobs: true`` (``chat(..., logprobs=True)``; no ``top_logprobs``): mlx_lm.server
then returns ``choices[0].logprobs.content[i].id``, one per generated token, stop token
included (``completion_ids``). For a server that does not return ids, compare at
message boundaries only: every earlier request's prompt (``chat_tokens``) is a prefix of
what it stored, so ``oracle_cached(earlier prompts, prompt)`` is a lower bound on ideal
reuse, and adding the matching request's ``usage.completion_tokens`` an upper bound; or
build histories from fixed assistant strings and use the bounds the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# CHAT_TEMPLATE plus tools and tool calls, Hermes style (as Qwen2.5's): the tools as JSON lines in
# the system turn, an assistant's calls as <tool_call>{"name": ..., "arguments": {...}}</tool_call>,
# tool results as <tool_response> blocks in a user turn. mlx-lm picks its "json_tools" parser for it
# ("<tool_call>" and "tool_call.name" in the template). Without tools it renders as CHAT_TEMPLATE.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}"
    "{{- '</tools>\\n\\nTo call a function answer with <tool_call>{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}</tool_call><|im_end|>\\n' }}"
    "{%- elif messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- set tool_call = tool_call.function if tool_call.function is defined else tool_call %}"
    "{{- '<tool_call>{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + (tool_call.arguments | tojson) + '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A cache keeps the work that was done before,
so the next request that starts the same way does not have to do it again.
Once upon a time there was a little house at the edge of a quiet wood. In the house lived
an old man, his daughter and a small grey cat who liked to sleep by the fire.
Every morning the man walked to the river to fetch water, and every evening the daughter
read stories aloud while the cat listened with its eyes half closed.
What is the capital of France? The capital of France is Paris. What is two plus two?
Two plus two is four. Please write a short poem about the sea and the sky.
You are a helpful assistant. Answer the question in one sentence. Thank you very much!
The user asked a question and the assistant gave an answer. Then the user asked another
question, and the conversation went on for many turns, each one a little longer.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024. Punctuation: , . ; : ! ? ' " ( ) - /
Good morning, how are you today? I am fine, thanks. It is a lovely day for a walk in the park.
Large language models read text as tokens, and a prefix tree can share the tokens that two
prompts have in common. When memory runs out, the least recently used branches are dropped.
"""


def _python() -> str:
    return sys.executable


# ----------------------------------------------------------------------------------------
# Tiny model directory
# ----------------------------------------------------------------------------------------


def _llama_config(vocab_size: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def _qwen3_next_config(vocab_size: int) -> dict:
    # Layers 0-2 are gated delta-net (linear) layers, layer 3 full attention
    # ((i + 1) % full_attention_interval == 0). num_experts=0: every layer gets the dense
    # Qwen3NextMLP, and sanitize() returns the weights untouched (it only rewrites
    # checkpoints that have per-expert MoE weights, adding 1 to norm weights then).
    return {
        "model_type": "qwen3_next",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 0,
        "num_experts_per_tok": 1,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "max_position_embeddings": 4096,
        "full_attention_interval": 4,
        "tie_word_embeddings": False,
    }


def _llama_kv_config(vocab_size: int) -> dict:
    # KV-heavy and cheap to compute: 8 layers x 8 KV heads x head_dim 128 in float32 is
    # 2 x 8 x 8 x 128 x 4 = 64 KiB of KV per token (half of Llama-3.1-8B's bf16 128 KiB) on
    # ~11M weights, so memory benchmarks fill a budget of hundreds of MiB in seconds.
    return {
        **_llama_config(vocab_size),
        "hidden_size": 256,
        "num_hidden_layers": 8,
        "intermediate_size": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 128,
    }


def _llama_kv_tiny_config(vocab_size: int) -> dict:
    # the test suite's KV-heavy model (hidden 128, 4 layers): 2 x 4 x 8 x 128 x 4 = 32 KiB of KV per token
    return {**_llama_kv_config(vocab_size), "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 256}


ARCHS = {
    "llama": _llama_config, "llama-kv": _llama_kv_config, "llama-kv-tiny": _llama_kv_tiny_config,
    "qwen3_next": _qwen3_next_config,
}


def _write_tokenizer(path: Path, vocab_size: int = 384, chat_template: str = CHAT_TEMPLATE) -> tuple[int, int]:
    """Train a byte-level BPE on CORPUS; write tokenizer files. Returns (vocab size, eos id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id("<|im_end|>")

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return n_vocab, eos_id


def build_model(config: dict, seed: int = 0):
    """The mlx-lm model for ``config`` with seeded random float32 weights (evaluated)."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config=config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def make_model_dir(
    path, arch: str = "llama", seed: int = 0, *, check: bool = True, tools: bool = False
) -> Path:
    """Write a tiny random ``arch`` model ("llama", "llama-kv" or "qwen3_next") in Hugging Face layout.

    "llama-kv" is a KV-heavy llama (hidden 256, 8 layers, 8 KV heads x head_dim 128:
    64 KiB of float32 KV per token) for memory benchmarks.

    Files: config.json, model.safetensors (float32, seeded), tokenizer.json (byte-level
    BPE, ~384 tokens incl. <|endoftext|> <|im_start|> <|im_end|>), tokenizer_config.json
    (ChatML template, eos <|im_end|>), special_tokens_map.json. With ``check`` the
    directory is loaded back with ``mlx_lm.load`` and the logits compared to the built
    model's (a weight-name or sanitize mismatch raises). Deterministic for a given seed.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, not {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    n_vocab, eos_id = _write_tokenizer(path, chat_template=TOOLS_CHAT_TEMPLATE if tools else CHAT_TEMPLATE)
    config = ARCHS[arch](n_vocab)
    config["eos_token_id"] = eos_id
    config["torch_dtype"] = "float32"
    model = build_model(config, seed)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(
        str(path / "model.safetensors"), weights, metadata={"format": "mlx"}
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))

    if check:
        _check_round_trip(path, model, eos_id)
    return path


def _check_round_trip(path: Path, model, eos_id: int) -> None:
    import mlx.core as mx
    import mlx_lm

    loaded, tokenizer = mlx_lm.load(str(path))
    tokens = mx.array([[5, 17, 42, 100, eos_id, 7, 250]])
    a, b = model(tokens), loaded(tokens)
    diff = mx.abs(a - b).max().item()
    if diff != 0.0:
        raise AssertionError(
            f"{path}: loaded model's logits differ from the built one by {diff}"
        )
    if tokenizer.eos_token_ids != {eos_id}:
        raise AssertionError(
            f"{path}: eos ids {tokenizer.eos_token_ids}, expected {{{eos_id}}}"
        )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    text = tokenizer.decode(ids)
    if text != "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n":
        raise AssertionError(f"{path}: chat template renders {text!r}")


# ----------------------------------------------------------------------------------------
# Server process
# ----------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlx_lm_server_cmd(model_dir, port: int, *extra: str) -> list[str]:
    """``python -m mlx_lm server --model DIR --host 127.0.0.1 --port PORT *extra``."""
    return [
        _python(),
        "-m",
        "mlx_lm",
        "server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


class ServerProcess:
    """A server subprocess, started on ``__enter__`` (or ``start()``) and always cleaned up.

    ``cmd`` must make the server listen on ``host:port`` (e.g. ``mlx_lm_server_cmd``).
    stdout and stderr go to ``log_path`` (a temporary file unless given). ``start()``
    waits until ``GET /health`` answers 200; note that mlx_lm.server answers /health
    before the model has loaded (loading happens in its generation thread), so the first
    request may take longer. Raises RuntimeError with the log tail if the process exits,
    /health answers non-200 (``unhealthy_is_fatal``; mlx_lm.server's 503 means its
    generation thread died, e.g. the model failed to load, while the process stays up) or
    ``timeout`` seconds pass. ``__exit__`` always stops the process (SIGTERM, then SIGKILL);
    the process runs in its own session, so a signal does not reach the test runner.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        port: int,
        *,
        host: str = "127.0.0.1",
        timeout: float = 60.0,
        log_path=None,
        env: dict | None = None,
        cwd=None,
        unhealthy_is_fatal: bool = True,
    ):
        self.cmd = [str(c) for c in cmd]
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.timeout = timeout
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.unhealthy_is_fatal = unhealthy_is_fatal
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` log lines, leaving out the access-log lines of /health polls."""
        lines = [l for l in self.log_text().splitlines() if '"GET /health' not in l]
        return "\n".join(lines[-n:])

    def start(self) -> Self:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        t0 = time.monotonic()
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"server exited with {rc} before /health answered; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            status = self.health_status()
            if status == 200:
                return
            if status is not None and self.unhealthy_is_fatal:
                # mlx_lm.server answers 503 only once its generation thread has died
                # (e.g. the model failed to load); the process itself stays up.
                raise RuntimeError(
                    f"server answered /health with {status}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() - t0 > self.timeout:
                raise RuntimeError(
                    f"server did not answer /health within {self.timeout}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def health_status(self) -> int | None:
        """The HTTP status of ``GET /health``, or None if nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, ConnectionError, OSError):
            return None

    def healthy(self) -> bool:
        return self.health_status() == 200

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, wait: float | None = 10.0) -> int | None:
        """Send ``sig`` to the server; wait for it to exit (unless ``wait`` is None)."""
        if self.alive():
            self.proc.send_signal(sig)
            if wait is not None:
                try:
                    return self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    return None
        return None if self.proc is None else self.proc.returncode

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace)
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------


def post_json(url: str, path: str, body: dict, timeout: float = 120.0) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {path} -> {e.code}: {e.read()[:2000]!r}") from None


def chat(
    url: str,
    messages: list[dict],
    max_tokens: int = 16,
    *,
    timeout: float = 120.0,
    **kw: Any,
) -> dict:
    """POST /v1/chat/completions, greedy (temperature 0), non-streaming; the parsed JSON.

    Extra keyword arguments go into the body (``logprobs=True`` for the generated ids,
    ``seed=0`` to make mlx_lm.server take its single-request path, ``stop=[...]``).
    """
    body = {
        "model": "default_model",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": False,
    }
    body.update(kw)
    return post_json(url, "/v1/chat/completions", body, timeout=timeout)


def cached_tokens(response: dict) -> int:
    """``usage.prompt_tokens_details.cached_tokens`` (0 when absent)."""
    usage = response.get("usage") or {}
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def prompt_tokens(response: dict) -> int:
    return int(response["usage"]["prompt_tokens"])


def reply_text(response: dict) -> str:
    return response["choices"][0]["message"]["content"] or ""


def completion_ids(response: dict) -> list[int]:
    """Generated token ids (stop token included) from a ``logprobs=True`` response."""
    lp = response["choices"][0].get("logprobs")
    if not lp or "content" not in lp:
        raise ValueError("response has no logprobs; send chat(..., logprobs=True)")
    return [int(c["id"]) for c in lp["content"]]


# ----------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(model_dir):
    """The TokenizerWrapper mlx_lm loads for ``model_dir`` (cached per directory)."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_tokenizer as _load

    key = str(Path(model_dir).resolve())
    if key not in _TOKENIZERS:
        config = load_config(Path(key))
        _TOKENIZERS[key] = _load(Path(key), eos_token_ids=config.get("eos_token_id"))
    return _TOKENIZERS[key]


def chat_tokens(model_dir, messages: list[dict]) -> list[int]:
    """The prompt ids mlx_lm.server computes for ``messages`` (add_generation_prompt)."""
    tok = load_tokenizer(model_dir)
    return list(
        tok.apply_chat_template(
            messages, add_generation_prompt=True, tools=None, tokenize=True
        )
    )


def stored_after(prompt: Sequence[int], completion: Sequence[int]) -> list[int]:
    """The key mlx_lm.server stores after a request: prompt + every generated id.

    ``completion`` as ``completion_ids(response)`` gives it: stop token included.
    Same on the single and batched paths (the batched path may also store a system-prompt
    checkpoint, see the module docstring).
    """
    return list(prompt) + list(completion)


def system_end(model_dir, messages: list[dict]) -> int:
    """Where mlx_lm.server's "system" segment of ``messages`` ends (0: no such segment).

    As ``ResponseGenerator._tokenize``: only for a chat whose last message is a user
    message and that starts with system message(s); the first index where the prompt
    differs from the template of the system messages + an empty user message.
    """
    if not messages or messages[-1]["role"] != "user":
        return 0
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys]["role"] == "system":
        n_sys += 1
    if n_sys == 0:
        return 0
    prompt = chat_tokens(model_dir, messages)
    tok = load_tokenizer(model_dir)
    sys_tokens = tok.apply_chat_template(
        messages[:n_sys] + [{"role": "user", "content": ""}],
        add_generation_prompt=False,
        tools=None,
        tokenize=True,
    )
    end = 0
    for i, (a, b) in enumerate(zip(sys_tokens, prompt)):
        if a != b:
            end = i
            break
    return end if 0 < end < len(prompt) else 0


def batched_checkpoints(
    prompt: Sequence[int], cached: int, sys_end: int = 0
) -> list[list[int]]:
    """The extra keys mlx_lm.server's batched path stores while prefilling ``prompt``.

    ``cached`` is the request's ``cached_tokens``, ``sys_end`` is ``system_end(...)``.
    The prompt is cut into segments at ``sys_end`` (if any) and the uncached part of
    each is prefilled; ``BatchGenerator.insert_segments`` splits the last prompt token
    off into its own segment, and the cache is stored at the end of every typed segment
    that is not the end of the prompt. In practice: ``prompt[:sys_end]`` if the system
    segment is not fully cached, and ``prompt[:-1]`` unless only 1 token was uncached.
    (For a trimmable cache the final ``prompt + completion`` insert then drops them.)
    """
    n = len(prompt)
    bounds = [b for b in ([sys_end] if sys_end else []) + [n] if b > cached]
    if not bounds:
        return []
    ends = bounds[:-1]
    last_start = max(bounds[-2] if len(bounds) > 1 else 0, cached)
    if n - last_start > 1:  # split off the last token: the typed segment ends at n - 1
        ends.append(n - 1)
    return [list(prompt[:e]) for e in ends]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def oracle_cached(stored: Sequence[Sequence[int]], prompt: Sequence[int]) -> int:
    """Exact prefix reuse with unlimited memory and trimmable caches.

    The longest common prefix of ``prompt`` with any stored sequence, capped at
    ``len(prompt) - 1`` (the last prompt token is always run to get logits).
    """
    if not prompt:
        return 0
    best = max((_common_prefix(s, prompt) for s in stored), default=0)
    return min(best, len(prompt) - 1)


def oracle_cached_untrimmable(
    stored: Sequence[Sequence[int]], prompt: Sequence[int]
) -> int:
    """mlx_lm.server's reuse for a non-trimmable cache (ArraysCache layers).

    Only a stored sequence that is a whole prefix of the prompt (length >= 2, since
    PromptTrie ignores a 1-token prefix) can be reused; a stored sequence equal to the
    prompt counts fully (``len(prompt)``, the exact-match case).
    """
    best = 0
    for s in stored:
        if 2 <= len(s) <= len(prompt) and list(prompt[: len(s)]) == list(s):
            best = max(best, len(s))
    return best
