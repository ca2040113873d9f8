"""A long, mixed, seeded HTTP workload for a prompt-cache server, and a sampler of its memory.

A helper module for tests and benchmarks (it holds no tests):

* ``RssSampler(pid)`` samples the resident memory (``VmRSS``) of one process from
  ``/proc/PID/status`` in a thread; ``mark(label)`` records where a driver is (request index)
  with the time and the RSS right then, so a trajectory can be drawn per request.
* ``listening_pid(port, root)`` finds the process that serves a port (the one to sample: a
  launcher or wrapper process may sit above it).
* ``soak_workload(model_dir, requests=500, ...)`` builds a seeded mix of chat users, agents
  whose histories grow by tool outputs and fork into sub-agents, and one-off documents,
  interleaved. Only the user-side text is fixed in advance: the assistant turns of a history
  are the replies the server actually returned, so a driver sends one request at a time and
  feeds each reply back (``SoakWorkload.start()`` gives the per-run histories).
* ``drive(url, model_dir, workload)`` does exactly that over ``/v1/chat/completions``
  (greedy, ``logprobs`` for the generated ids) and returns one record per request.

Why a soak: the memory a server holds for its prompt cache only shows after the cache has
filled, paged and evicted many times over, and the in-flight working set only shows at the
largest requests; a few requests measure neither. The mix is the traffic a prefix cache
sees: conversations that come back (chat users), long histories that branch (agents), and
large prompts that never come back (documents), which a byte budget must let go.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import CORPUS, cached_tokens, chat, chat_tokens, completion_ids, load_tokenizer, prompt_tokens, reply_text

WORDS = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", CORPUS)})


# ----------------------------------------------------------------------------------------
# Resident memory of a process
# ----------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The ``Vm*``/``Rss*`` lines of ``/proc/PID/status`` in bytes ({} once the process is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key.startswith(("Vm", "Rss")) and len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in bytes (Rss, Anonymous, Pss_File, ...; {} where unreadable):
    which part of the RSS is anonymous memory (heap, MLX buffers) and which mapped files."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key.strip()] = int(parts[0]) * 1024
    return out


class RssSampler:
    """Samples a process's ``VmRSS`` every ``period`` seconds in a daemon thread.

    ``samples``: (monotonic time, RSS bytes); ``marks``: (label, time, RSS bytes read at the
    mark); ``peak``: the largest RSS seen (samples and marks). ``reset_peak()`` clears the
    kernel's high-water mark (``VmHWM``, via ``clear_refs``) so that ``hwm()`` afterwards is
    the true peak since then, which a sampler can miss between two samples.
    """

    def __init__(self, pid: int, period: float = 0.1):
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period!r}")
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[Any, float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def rss(self) -> int:
        """The process's VmRSS now (0 once it is gone)."""
        return proc_status(self.pid).get("VmRSS", 0)

    def hwm(self) -> int:
        """The process's VmHWM now: its peak RSS since it started or since ``reset_peak()``."""
        return proc_status(self.pid).get("VmHWM", 0)

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``); False if not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @property
    def peak(self) -> int:
        with self._lock:
            values = [r for _, r in self.samples] + [r for _, _, r in self.marks]
        return max(values, default=0)

    def sample(self) -> int:
        """Take one sample now (the thread calls this; a driver may too)."""
        rss = self.rss()
        if rss:
            with self._lock:
                self.samples.append((time.monotonic(), rss))
        return rss

    def mark(self, label: Any) -> int:
        """Record ``label`` (e.g. a request index) with the time and the RSS read right now."""
        rss = self.rss()
        with self._lock:
            self.marks.append((label, time.monotonic(), rss))
        return rss

    def start(self) -> RssSampler:
        if self._thread is not None:
            raise RuntimeError("RssSampler already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    return inodes


def listening_pid(port: int, root: int) -> int | None:
    """The process in ``root``'s tree (``root`` included) that holds the socket listening on
    ``port``: the server itself, whether it was started directly, through a console script or
    under a wrapper. None if no process of that tree listens there."""
    wanted = {f"socket:[{i}]" for i in _listening_inodes(port)}
    todo, seen = [root], set()
    while todo and wanted:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            fds = []
        for fd in fds:
            try:
                if str(fd.readlink()) in wanted:
                    return pid
            except OSError:
                continue
        todo += _children(pid)
    return None


# ----------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakStep:
    """One request of a soak: a new user message in a conversation.

    ``conversation`` is started by its first step (with ``system`` when it has one); a step
    with ``fork_of`` starts ``conversation`` as a copy of that conversation's history as it
    stands when this step is sent (a sub-agent taking over an agent's context).
    """

    index: int
    kind: str  # "chat", "agent" or "doc"
    conversation: int
    text: str
    system: str | None = None
    fork_of: int | None = None


@dataclass(frozen=True)
class SoakWorkload:
    """The fixed part of a soak (every user-side message, in order) and how it was built."""

    steps: tuple[SoakStep, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    def kinds(self) -> dict[str, int]:
        """Requests per kind."""
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def start(self) -> SoakReplay:
        """Fresh histories for one run of this workload against a server."""
        return SoakReplay(self)


class SoakReplay:
    """The conversations of one run: ``messages(step)`` is what to send for a step, and
    ``record(step, reply)`` appends the step's user message and the server's reply to the
    conversation's history, so the next step of that conversation carries them. Steps must
    go in order (a later step may depend on an earlier reply)."""

    def __init__(self, workload: SoakWorkload):
        self.workload = workload
        self.histories: dict[int, list[dict]] = {}
        self.next_index = 0

    def messages(self, step: SoakStep) -> list[dict]:
        if step.index != self.next_index:
            raise ValueError(f"steps go in order: expected step {self.next_index}, got {step.index}")
        if step.fork_of is not None:
            base = list(self.histories[step.fork_of])
        else:
            base = list(self.histories.get(step.conversation, []))
            if not base and step.system is not None:
                base = [{"role": "system", "content": step.system}]
        return base + [{"role": "user", "content": step.text}]

    def record(self, step: SoakStep, reply: str) -> None:
        self.histories[step.conversation] = self.messages(step) + [{"role": "assistant", "content": reply}]
        self.next_index += 1


def words(rng: random.Random, n: int) -> str:
    """``n`` random words of CORPUS's vocabulary as sentences (a capital, a full stop every
    6-14 words): text the bundled BPE tokenizes well, and that no other text shares for long."""
    out: list[str] = []
    left = n
    while left > 0:
        k = min(left, rng.randint(6, 14))
        sentence = [rng.choice(WORDS) for _ in range(k)]
        sentence[0] = sentence[0].capitalize()
        out.append(" ".join(sentence) + ".")
        left -= k
    return " ".join(out)


class _Texts:
    """Random text of about a given number of tokens (measured with the model's tokenizer)."""

    def __init__(self, model_dir, rng: random.Random):
        self.tok = load_tokenizer(model_dir)
        self.rng = rng
        sample = words(random.Random(0), 400)
        self.per_word = len(self.tok.encode(sample)) / 400

    def tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    def text(self, n_tokens: int, prefix: str = "") -> str:
        """``prefix`` + random words, about ``n_tokens`` tokens in all (within a few tokens)."""
        n_words = max(1, round((n_tokens - self.tokens(prefix)) / self.per_word))
        body = words(self.rng, n_words)
        for _ in range(2):  # correct the estimate once or twice; exact counts do not matter
            got = self.tokens(prefix + body)
            if abs(got - n_tokens) <= max(4, n_tokens // 50):
                break
            n_words = max(1, round(n_words * n_tokens / max(got, 1)))
            body = words(self.rng, n_words)
        return prefix + body


@dataclass
class _Conv:
    """A conversation while the schedule is built: what is left of it and its size so far."""

    id: int
    kind: str
    left: int  # steps still to send
    tokens: int  # estimated prompt tokens of its next request (history so far)
    steps: int = 0


def soak_workload(
    model_dir,
    requests: int = 500,
    seed: int = 0,
    doc_tokens: int = 1300,
    *,
    mix: tuple[float, float, float] = (0.4, 0.45, 0.15),
    chat_system_tokens: int = 150,
    chat_doc_tokens: int | None = None,
    chat_turns: tuple[int, int] = (2, 6),
    question_tokens: tuple[int, int] = (8, 40),
    agent_system_tokens: int = 400,
    agent_steps: tuple[int, int] = (3, 8),
    tool_tokens: tuple[int, int] = (150, 400),
    fork_prob: float = 0.12,
    fork_steps: tuple[int, int] = (1, 3),
    max_context: int = 2800,
    active_chats: int = 12,
    active_agents: int = 4,
) -> SoakWorkload:
    """A seeded soak of ``requests`` requests, interleaved in a seeded order.

    Each request is, by ``mix`` (weights of chat, agent, document):

    * chat: a user's next turn, or a new user (up to ``active_chats`` at once). Every chat
      user shares one system prompt (``chat_system_tokens``); a user's first turn carries its
      own document of ``chat_doc_tokens`` (default ``doc_tokens``; 0: none) and a question,
      later turns a short question (``question_tokens``); ``chat_turns`` turns in all.
    * agent: an agent's next step, or a new agent (up to ``active_agents`` at once). Agents
      share one system prompt (``agent_system_tokens``); the first step states a task, each
      later step is a tool's output (``tool_tokens``) sent as a user message. After a step an
      agent forks with ``fork_prob``: a sub-agent continues from a copy of its history for
      ``fork_steps`` steps of its own (the parent goes on too). An agent stops after
      ``agent_steps`` steps or once its history would pass ``max_context`` tokens.
    * doc: a one-off document of ``doc_tokens`` tokens and a request to summarize it, sent
      once and never continued.

    Token sizes are measured with the model's tokenizer (histories are estimated: the
    replies are unknown until the run, each is at most the driver's ``max_tokens``).
    """
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise ValueError(f"mix must be 3 non-negative weights (chat, agent, doc), got {mix!r}")
    rng = random.Random(seed)
    texts = _Texts(model_dir, random.Random(seed + 1))
    chat_doc = doc_tokens if chat_doc_tokens is None else chat_doc_tokens
    chat_system = texts.text(chat_system_tokens, "You are a helpful assistant for many users. ")
    agent_system = texts.text(agent_system_tokens, "You are a coding agent. You call tools and read their output. ")
    turn_overhead = 8 + 16  # template tokens of a user and an assistant message, and a short reply

    steps: list[SoakStep] = []
    chats: list[_Conv] = []
    agents: list[_Conv] = []
    next_id = 0

    def new_id() -> int:
        nonlocal next_id
        next_id += 1
        return next_id - 1

    def add(kind: str, conv: int, text: str, system: str | None = None, fork_of: int | None = None) -> None:
        steps.append(SoakStep(len(steps), kind, conv, text, system, fork_of))

    def question() -> str:
        return texts.text(rng.randint(*question_tokens), "Question: ")

    def chat_step() -> None:
        if rng.random() >= len(chats) / active_chats:  # the pool hovers near its size
            c = _Conv(new_id(), "chat", rng.randint(*chat_turns), 0)
            doc = texts.text(chat_doc, f"My notes ({c.id}):\n") + "\n\n" if chat_doc else f"I am user {c.id}. "
            text = doc + question()
            add("chat", c.id, text, system=chat_system)
            c.tokens = chat_system_tokens + texts.tokens(text) + turn_overhead
            chats.append(c)
        else:
            c = rng.choice(chats)
            text = question()
            add("chat", c.id, text)
            c.tokens += texts.tokens(text) + turn_overhead
        c.left -= 1
        c.steps += 1
        if c.left <= 0:
            chats.remove(c)

    def agent_step() -> None:
        if rng.random() >= len(agents) / active_agents:
            a = _Conv(new_id(), "agent", rng.randint(*agent_steps), 0)
            text = texts.text(rng.randint(30, 80), f"Task {a.id}: ")
            add("agent", a.id, text, system=agent_system)
            a.tokens = agent_system_tokens + texts.tokens(text) + turn_overhead
            agents.append(a)
        else:
            parent = rng.choice(agents)
            a, fork_of = parent, None
            if parent.steps >= 2 and rng.random() < fork_prob:
                a = _Conv(new_id(), "agent", rng.randint(*fork_steps), parent.tokens, parent.steps)
                fork_of = parent.id
                agents.append(a)
            text = texts.text(rng.randint(*tool_tokens), f"[tool output, step {a.steps}]\n")
            add("agent", a.id, text, fork_of=fork_of)
            a.tokens += texts.tokens(text) + turn_overhead
        a.left -= 1
        a.steps += 1
        if a.left <= 0 or a.tokens + tool_tokens[1] + turn_overhead > max_context:
            agents.remove(a)

    def doc_step() -> None:
        conv = new_id()
        add("doc", conv, texts.text(doc_tokens, f"Document {conv}:\n") + "\n\nSummarize the document in one sentence.")

    kinds = (chat_step, agent_step, doc_step)
    while len(steps) < requests:
        rng.choices(kinds, weights=mix)[0]()
    params = {
        "requests": requests, "seed": seed, "doc_tokens": doc_tokens, "mix": list(mix),
        "chat_system_tokens": chat_system_tokens, "chat_doc_tokens": chat_doc, "chat_turns": list(chat_turns),
        "question_tokens": list(question_tokens), "agent_system_tokens": agent_system_tokens,
        "agent_steps": list(agent_steps), "tool_tokens": list(tool_tokens), "fork_prob": fork_prob,
        "fork_steps": list(fork_steps), "max_context": max_context, "active_chats": active_chats,
        "active_agents": active_agents,
    }
    return SoakWorkload(tuple(steps), params)


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------


def drive(
    url: str,
    model_dir,
    workload: SoakWorkload,
    max_tokens: int = 8,
    on_request: Callable[[int, dict], None] | None = None,
    *,
    timeout: float = 600.0,
) -> list[dict]:
    """Send every step of ``workload`` to ``url`` in order, one at a time, feeding each reply
    back into its conversation; return one record per request.

    Requests are greedy (temperature 0), non-streaming, with ``logprobs`` so the generated ids
    come back (``completion_ids``). A record: ``index``, ``kind``, ``conversation``,
    ``prompt`` (the prompt ids, ``chat_tokens``), ``completion`` (generated ids, stop token
    included), ``prompt_tokens`` and ``cached_tokens`` (the server's usage), ``latency_s``
    (the whole request) and ``done_at`` (monotonic time). ``on_request(index, record)`` runs
    after each request (e.g. ``RssSampler.mark``). Raises RuntimeError when the server counts
    a different prompt than ``chat_tokens`` does (the comparison with an oracle would be off).
    """
    replay = workload.start()
    records: list[dict] = []
    for step in workload.steps:
        msgs = replay.messages(step)
        prompt = chat_tokens(model_dir, msgs)
        t = time.perf_counter()
        resp = chat(url, msgs, max_tokens, timeout=timeout, logprobs=True)
        latency = time.perf_counter() - t
        if prompt_tokens(resp) != len(prompt):
            raise RuntimeError(
                f"request {step.index}: the server counted {prompt_tokens(resp)} prompt tokens, chat_tokens {len(prompt)}"
            )
        replay.record(step, reply_text(resp))
        record = {
            "index": step.index, "kind": step.kind, "conversation": step.conversation,
            "prompt": prompt, "completion": completion_ids(resp),
            "prompt_tokens": prompt_tokens(resp), "cached_tokens": cached_tokens(resp),
            "latency_s": latency, "done_at": time.monotonic(),
        }
        records.append(record)
        if on_request is not None:
            on_request(step.index, record)
    return records


def stored_sequences(records: Sequence[dict]) -> list[list[int]]:
    """prompt + completion ids per request: what a server that keeps every request's KV holds."""
    return [list(r["prompt"]) + list(r["completion"]) for r in records]
