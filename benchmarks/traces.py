"""Seeded token-level request traces for judging eviction policies; no model, no tokenizer.

Token ids are random ints from a seeded RNG, replies included, so a trace is fixed by its
seed and `scale` (a multiplier on every length in tokens; the counts of users, turns and
requests stay). Each request says what a server holds after serving it (`stored`: the
prompt, then the generated reply minus its last token); the next turn of a conversation
carries the previous prompt and the whole reply as token lists, never re-tokenized, so a
follow-up extends the stored sequence exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Optional

import attrs
import numpy as np

from kvtrie.trie import Trie, as_token_array

VOCAB = 50_000
ROUND_ROBIN_DOC_TOKENS = 600


@attrs.frozen
class Request:
    """One request: who sent it, its prompt, and the tokens whose KV a server holds afterwards."""

    conversation: str
    prompt: list[int]
    stored: list[int]


class _Gen:
    """Lengths (scaled) and token runs from one seed: every choice a trace makes comes from here."""

    def __init__(self, seed: int, scale: float):
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.rng = random.Random(seed)
        self._np = np.random.default_rng(seed)
        self.scale = scale

    def n(self, lo: int, hi: Optional[int] = None) -> int:
        """A length in tokens drawn from [lo, hi] (or exactly lo), times the scale, at least 1."""
        base = lo if hi is None else self.rng.randint(lo, hi)
        return max(1, round(base * self.scale))

    def tokens(self, lo: int, hi: Optional[int] = None) -> list[int]:
        return self._np.integers(0, VOCAB, self.n(lo, hi)).tolist()


class _Conversation:
    """A growing token context: each turn appends a user message and the reply to it."""

    def __init__(self, name: str, context: list[int]):
        self.name = name
        self.context = list(context)
        self.boundaries: list[int] = [len(self.context)]  # context lengths after each turn

    def turn(self, g: _Gen, message: list[int], reply_lo: int, reply_hi: Optional[int] = None) -> Request:
        prompt = self.context + message
        reply = g.tokens(reply_lo, reply_hi)
        self.context = prompt + reply
        self.boundaries.append(len(self.context))
        return Request(self.name, prompt, prompt + reply[:-1])


def _reply(g: _Gen, name: str, prompt: list[int], lo: int, hi: Optional[int] = None) -> tuple[Request, list[int]]:
    """A request for `prompt` answered by a fresh random reply; also the context after it."""
    reply = g.tokens(lo, hi)
    return Request(name, prompt, prompt + reply[:-1]), prompt + reply


def round_robin_doc_tokens(scale: float = 1.0) -> int:
    """Tokens of one user's document in `round_robin` at this scale (the over-subscribed budget's unit)."""
    return max(1, round(ROUND_ROBIN_DOC_TOKENS * scale))


def round_robin(seed: int = 0, scale: float = 1.0, *, users: int = 12, turns: int = 4) -> list[Request]:
    """`users` users, each with its own document, `turns` turns strictly round robin.

    Turn 1 of every user, then turn 2 of every user, ...: under a budget smaller than the
    cycle, recency evicts each user just before that user returns.
    """
    g = _Gen(seed, scale)
    convs = [_Conversation(f"user{u}", g.tokens(ROUND_ROBIN_DOC_TOKENS)) for u in range(users)]
    out = []
    for _ in range(turns):
        for c in convs:
            out.append(c.turn(g, g.tokens(20, 40), 30))
    return out


def chat(seed: int = 0, scale: float = 1.0, *, users: int = 40, system_tokens: int = 400, max_active: int = 12) -> list[Request]:
    """A shared system prompt; users arrive over time, chat 2-8 turns at random, then leave."""
    g = _Gen(seed, scale)
    system = g.tokens(system_tokens)
    waiting = [(f"user{u}", g.rng.randint(2, 8)) for u in range(users)]
    waiting.reverse()
    active: dict[str, list] = {}  # name -> [conversation, turns left]
    out = []
    while waiting or active:
        if waiting and (len(active) < 2 or (len(active) < max_active and g.rng.random() < 0.35)):
            name, turns = waiting.pop()
            active[name] = [_Conversation(name, system), turns]
        name = g.rng.choice(sorted(active))
        conv, left = active[name]
        out.append(conv.turn(g, g.tokens(10, 60), 20, 150))
        if left == 1:
            del active[name]
        else:
            active[name][1] = left - 1
    return out


def shared_prefix(seed: int = 0, scale: float = 1.0, *, documents: int = 4, questions: int = 12) -> list[Request]:
    """A few long documents (600-1500 tokens), many short one-off questions about each, shuffled."""
    g = _Gen(seed, scale)
    docs = [g.tokens(600, 1500) for _ in range(documents)]
    order = [(d, q) for d in range(documents) for q in range(questions)]
    g.rng.shuffle(order)
    out = []
    for d, q in order:
        req, _ = _reply(g, f"doc{d}/q{q}", docs[d] + g.tokens(10, 40), 20, 60)
        out.append(req)
    return out


def regenerate_edit(
    seed: int = 0, scale: float = 1.0, *, users: int = 10, actions: int = 6, system_tokens: int = 300
) -> list[Request]:
    """Chats (interleaved users) where a user continues, regenerates the last answer (same prompt,
    new reply), or edits an earlier turn (the history up to it stays) and continues from there."""
    g = _Gen(seed, scale)
    system = g.tokens(system_tokens)
    history: dict[str, list[tuple[list[int], list[int]]]] = {f"user{u}": [] for u in range(users)}
    left = {name: actions for name in history}
    out = []
    while left:
        name = g.rng.choice(sorted(left))
        turns = history[name]
        action = g.rng.choices(["continue", "regenerate", "edit"], [2, 1, 1])[0] if turns else "continue"
        if action == "regenerate":
            question, _ = turns.pop()
        else:
            if action == "edit":
                del turns[g.rng.randrange(len(turns)) :]
            question = g.tokens(15, 50)
        prompt = list(system)
        for q, r in turns:
            prompt += q + r
        prompt += question
        req, after = _reply(g, name, prompt, 30, 120)
        turns.append((question, after[len(prompt) :]))
        out.append(req)
        left[name] -= 1
        if not left[name]:
            del left[name]
    return out


def agent_tree(
    seed: int = 0, scale: float = 1.0, *, trees: int = 2, context_tokens: int = 1500, depth: int = 3, branching: int = 3
) -> list[Request]:
    """A long shared context, then per task a tree search (breadth first): at each node
    `branching` sampled actions (replies to the same prompt); each action plus its tool result
    opens a child node. The trees' requests interleave at random."""
    g = _Gen(seed, scale)
    context = g.tokens(context_tokens)
    streams = []
    for t in range(trees):
        frontier = [context + g.tokens(30, 60)]
        stream = []
        for d in range(depth):
            children = []
            for i, prompt in enumerate(frontier):
                for b in range(branching):
                    req, after = _reply(g, f"tree{t}/d{d}/{i}.{b}", prompt, 20, 60)
                    stream.append(req)
                    children.append(after + g.tokens(50, 300))
            frontier = children
        streams.append(stream)
    return _interleave(g.rng, streams)


def coding_agent(
    seed: int = 0,
    scale: float = 1.0,
    *,
    conversations: int = 5,
    system_tokens: int = 2000,
    target_tokens: int = 15_000,
    fork_probability: float = 0.15,
) -> list[Request]:
    """Coding-agent sessions: a shared system prompt with tool schemas, a task, then steps of
    tool call (the reply) + tool output (200-2000 tokens) until ~`target_tokens`. Now and then a
    step forks a sub-agent that copies the parent's context up to one of its earlier step
    boundaries, adds its own task, and runs 3-8 steps on its own. All interleave at random."""
    g = _Gen(seed, scale)
    system = g.tokens(system_tokens)
    target = g.n(target_tokens)
    active: list[list] = []  # [conversation, steps left (None: until target), forks made]
    for c in range(conversations):
        active.append([_Conversation(f"agent{c}", system + g.tokens(100, 300)), None, 0])
    out = []
    pending: dict[str, list[int]] = {}  # the tool output each conversation's next prompt starts with
    while active:
        entry = g.rng.choice(active)
        conv, steps, forks = entry
        message = pending.pop(conv.name, [])
        out.append(conv.turn(g, message, 40, 200))
        pending[conv.name] = g.tokens(200, 2000) if steps is None else g.tokens(200, 1500)
        if steps is None and forks < 3 and g.rng.random() < fork_probability:
            at = g.rng.choice(conv.boundaries[1:])
            sub = _Conversation(f"{conv.name}/sub{forks}", conv.context[:at] + g.tokens(100, 300))
            active.append([sub, g.rng.randint(3, 8), 0])
            entry[2] += 1
        if steps is not None:
            entry[1] -= 1
        if (steps is None and len(conv.context) + len(pending[conv.name]) >= target) or entry[1] == 0:
            active.remove(entry)
    return out


def soak(
    seed: int = 0,
    scale: float = 1.0,
    *,
    requests: int = 520,
    system_tokens: int = 400,
    max_chats: int = 16,
    max_agents: int = 8,
) -> list[Request]:
    """A long mixed run: chat users on a shared system prompt, agent conversations growing by
    tool outputs, and one-off documents (~1.3k tokens) that are never seen again, interleaved."""
    g = _Gen(seed, scale)
    system = g.tokens(system_tokens)
    agent_system = g.tokens(1000)
    chats: list[list] = []  # [conversation, turns left]
    agents: list[_Conversation] = []
    counters = {"chat": 0, "agent": 0, "doc": 0}
    agent_target = g.n(6000)
    out: list[Request] = []
    while len(out) < requests:
        kind = g.rng.choices(["chat", "agent", "doc"], [45, 30, 25])[0]
        if kind == "chat":
            if len(chats) < max(1, max_chats // 2) or (len(chats) < max_chats and g.rng.random() < 0.2):
                chats.append([_Conversation(f"chat{counters['chat']}", system), g.rng.randint(2, 8)])
                counters["chat"] += 1
            entry = g.rng.choice(chats)
            out.append(entry[0].turn(g, g.tokens(10, 60), 20, 150))
            entry[1] -= 1
            if not entry[1]:
                chats.remove(entry)
        elif kind == "agent":
            if len(agents) < max(1, max_agents // 2) or (len(agents) < max_agents and g.rng.random() < 0.1):
                agents.append(_Conversation(f"agent{counters['agent']}", agent_system + g.tokens(50, 200)))
                counters["agent"] += 1
            conv = g.rng.choice(agents)
            out.append(conv.turn(g, g.tokens(100, 800), 30, 150))
            if len(conv.context) >= agent_target:
                agents.remove(conv)
        else:
            req, _ = _reply(g, f"doc{counters['doc']}", g.tokens(1250) + g.tokens(20, 80), 30, 100)
            out.append(req)
            counters["doc"] += 1
    return out


def _interleave(rng: random.Random, streams: Sequence[list[Request]]) -> list[Request]:
    """Merge streams at random, each stream's own order kept."""
    queues = [list(reversed(s)) for s in streams if s]
    out = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop())
        if not q:
            queues.remove(q)
    return out


TRACES: dict[str, Callable[..., list[Request]]] = {
    "round-robin": round_robin,
    "chat": chat,
    "shared-prefix": shared_prefix,
    "regenerate-edit": regenerate_edit,
    "agent-tree": agent_tree,
    "coding-agent": coding_agent,
    "soak": soak,
}


def build(name: str, seed: int = 0, scale: float = 1.0) -> list[Request]:
    """The trace called `name` (a key of TRACES)."""
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; known: {', '.join(TRACES)}")
    return TRACES[name](seed, scale)


# --- what a trace allows, whatever the policy ----------------------------------------------


def store(trie: Trie, tokens: Sequence[int], payload: object = None) -> None:
    """Insert `tokens` into a payload-free trie (splitting an edge where they leave it)."""
    arr = as_token_array(list(tokens))
    m = trie.match(arr)
    if m.length < len(arr):
        parent = trie.split(m.last, m.length) if m.ends_mid_edge else (m.last or trie.root)
        trie.add_child(parent, arr[m.length :], payload)


def unique_tokens(requests: Sequence[Request]) -> int:
    """Distinct positions over all stored sequences: what an unbounded prefix store holds at the end."""
    trie = Trie()
    for r in requests:
        store(trie, r.stored)
    return trie.num_tokens


def oracle_cached(requests: Sequence[Request]) -> int:
    """Prompt tokens reused with infinite memory and exact prefix reuse (at most len(prompt) - 1 each)."""
    trie = Trie()
    total = 0
    for r in requests:
        total += min(trie.match(as_token_array(r.prompt)).length, len(r.prompt) - 1)
        store(trie, r.stored)
    return total


def prompt_tokens(requests: Sequence[Request]) -> int:
    return sum(len(r.prompt) for r in requests)
