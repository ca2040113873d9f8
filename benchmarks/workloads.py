"""Seeded, deterministic request traces: multi-turn chat, shared-prefix groups, regenerate/edit, agent tree.

A trace is built once per model by actually serving it (the replies are what the model
generates, so each turn's prompt contains the previous reply), then every strategy
replays the same trace with the recorded replies forced, so prefill counts compare.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from kvtrie import PrefixCache
from kvtrie.models import ChatTemplate, Conversation, Sampler, generate
from kvtrie.trie import Trie, as_token_array

WORDS = (
    "cache prefix token memory budget page host device trie branch eviction latency prompt reply "
    "model layer state restore commit session reuse server request search plan tool result step"
).split()


@attrs.frozen
class Request:
    """One request of a trace: who sent it, the prompt, the reply to force, chat message ends."""

    conversation: str
    prompt: list[int]
    reply: list[int]
    hints: list[int] = attrs.field(factory=list)

    @property
    def committed(self) -> list[int]:
        """The tokens whose state a server holds after serving it: prompt + reply - last."""
        return self.prompt + self.reply[:-1]


@attrs.define
class Sizes:
    """Workload sizes; the defaults finish the whole benchmark in minutes on 2 cores."""

    users: int = 6
    turns: int = 4
    system_tokens: int = 400
    reply_tokens: int = 24
    groups: int = 3
    prompts_per_group: int = 6
    prefix_tokens: int = 600
    tree_context: int = 800
    tree_depth: int = 3
    tree_branching: int = 2


class Tracer:
    """Serves requests on the model (kvtrie, unlimited) to learn the replies, recording the trace."""

    def __init__(self, model, tokenizer, seed: int):
        self.model, self.tokenizer = model, tokenizer
        self.template = ChatTemplate(tokenizer)
        self.cache = PrefixCache(model.make_cache)
        self.rng = random.Random(seed)
        self.trace: list[Request] = []

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def long_text(self, tokens: int) -> str:
        """About `tokens` byte-tokens of text (the bundled tokenizer is byte level)."""
        out = ""
        while len(self.tokenizer.encode(out)) < tokens:
            out += self.text(8, 16) + ". "
        return out

    def serve(self, name: str, conv: Conversation, max_tokens: int, temperature: float = 0.0) -> list[int]:
        prompt = conv.prompt()
        sampler = Sampler(temperature=temperature, seed=self.rng.randrange(2**31))
        result = generate(
            self.model,
            self.cache,
            prompt,
            max_tokens=max_tokens,
            sampler=sampler,
            stop_tokens=sorted(self.tokenizer.eos_ids),
            capture_hints=conv.boundaries,
        )
        self.trace.append(Request(name, prompt, result.tokens, conv.boundaries))
        return result.tokens


def multi_turn_chat(t: Tracer, z: Sizes) -> None:
    """U users x T turns after one shared system prompt; arrivals interleave at random."""
    system = t.long_text(z.system_tokens)
    convs = {f"user{u}": Conversation(t.template, system=system) for u in range(z.users)}
    left = {name: z.turns for name in convs}
    while left:
        name = t.rng.choice(sorted(left))
        conv = convs[name]
        conv.add_user(t.text(6, 20) + "?")
        conv.add_reply(t.serve(name, conv, z.reply_tokens))
        left[name] -= 1
        if not left[name]:
            del left[name]


def shared_prefix_groups(t: Tracer, z: Sizes) -> None:
    """G groups (a long document each) x P short questions about it, interleaved."""
    docs = [t.long_text(z.prefix_tokens) for _ in range(z.groups)]
    order = [(g, p) for g in range(z.groups) for p in range(z.prompts_per_group)]
    t.rng.shuffle(order)
    for g, p in order:
        conv = Conversation(t.template, system=docs[g])
        conv.add_user(f"question {p}: " + t.text(4, 10) + "?")
        t.serve(f"group{g}/q{p}", conv, 8)


def regenerate_edit(t: Tracer, z: Sizes) -> None:
    """Users chat, regenerate an answer (sampled, so it differs), or edit an earlier turn and go on."""
    system = t.long_text(z.system_tokens)
    for u in range(z.users):
        history: list[tuple[str, list[int]]] = []  # (user text, reply) per turn
        conv = Conversation(t.template, system=system)
        for _ in range(z.turns):
            action = t.rng.choice(["continue", "regenerate", "edit"]) if history else "continue"
            if action == "regenerate":  # same prompt, a new answer replaces the old one
                question, _ = history.pop()
            elif action == "edit":  # rewrite an earlier user turn and continue from there
                k = t.rng.randrange(len(history))
                history = history[:k]
                question = t.text(6, 20) + " (edited)?"
            else:
                question = t.text(6, 20) + "?"
            conv = Conversation(t.template, system=system)
            for q, r in history:
                conv.add_user(q)
                conv.add_reply(r)
            conv.add_user(question)
            reply = t.serve(f"user{u}", conv, z.reply_tokens, temperature=0.8)
            history.append((question, reply))


def agent_tree(t: Tracer, z: Sizes) -> None:
    """A tree search from one long context: at each node the agent samples several actions
    (replies to the same prompt), and each action's tool result opens a child node."""
    context = t.long_text(z.tree_context)
    root = Conversation(t.template, system=context)
    root.add_user("task: " + t.text(8, 12))
    frontier = [root]
    for depth in range(z.tree_depth):
        children = []
        for i, node in enumerate(frontier):
            for b in range(z.tree_branching):
                action = t.serve(f"agent/d{depth}/{i}.{b}", node, 16, temperature=0.8)
                child = node.fork()
                child.add_reply(action)
                child.add_user("tool result: " + t.text(10, 30))
                children.append(child)
        frontier = children


WORKLOADS: dict[str, Callable[[Tracer, Sizes], None]] = {
    "multi-turn chat": multi_turn_chat,
    "shared-prefix groups": shared_prefix_groups,
    "regenerate / edit": regenerate_edit,
    "agent tree": agent_tree,
}


def build(name: str, model, tokenizer, sizes: Sizes, seed: int = 0) -> list[Request]:
    tracer = Tracer(model, tokenizer, seed)
    WORKLOADS[name](tracer, sizes)
    return tracer.trace


def _store(trie: Trie, tokens: list[int]) -> None:
    arr = as_token_array(tokens)
    m = trie.match(arr)
    if m.length < len(arr):
        parent = trie.split(m.last, m.length) if m.ends_mid_edge else (m.last or trie.root)
        trie.add_child(parent, arr[m.length :], None)


def oracle_prefill(trace: list[Request]) -> int:
    """Prefill with exact prefix reuse and infinite memory, from the trace alone.

    Each request reuses its longest common prefix with any earlier stored sequence
    (prompt + reply - 1), minus the one held-back token.
    """
    trie = Trie()
    total = 0
    for r in trace:
        best = trie.match(as_token_array(r.prompt)).length
        total += len(r.prompt) - min(best, len(r.prompt) - 1)
        _store(trie, r.committed)
    return total


def unique_tokens(seqs: list[list[int]]) -> int:
    """Distinct prefixes (positions) across sequences: what a perfect prefix store holds."""
    trie = Trie()
    for s in seqs:
        if s:
            _store(trie, s)
    return trie.num_tokens
