"""The next turn ready before it arrives: after a chat reply, `kvtrie serve` computes the state of
the conversation as the client will send it back, in the background.

The server stores what it generated (prompt + generated ids), but the next request renders the
reply again from text: the chat template drops earlier turns' reasoning, changes what surrounds
the reply (an empty `<think></think>` block in the generation prompt but not in history, an
end-of-turn token and newline the model never produced), and BPE merges across the reply's
edges. So a follow-up leaves the trie inside the previous reply, and the whole reply is computed
again on the next request's critical path.

The mechanism (`with_next_turn` around mlx-lm's `ResponseGenerator`):
- hook: `generate()`'s response stream is watched (both `/v1/chat/completions` and `/v1/messages`
  go through it); when a chat reply completes, its text is split as mlx-lm's handler splits it
  (reasoning left out, tool calls parsed) and the request's messages, tools and template args are
  queued with it (`Reply`). Nothing else happens on the request's path.
- what: on the generation thread, the conversation plus the assistant reply (text as `content`,
  calls as `tool_calls`, as a client sends them back) is rendered twice, each time followed by
  a different probe message (a user message, or a tool result after tool calls); the common
  prefix of the two is what every next request of the conversation starts with, up to its new
  message (`next_turn_prefix`: templates that strip reasoning only before the last user message
  strip it here too). What of it the trie does not hold is prefilled and stored through the
  PrefixCache (restore what is stored, prefill the rest, commit), so states belong to the tokens
  they were computed for and warm equals cold.
- priority: a job runs only in the loop's idle wait (`_next_request` called with a timeout, no
  request queued), one chunk of `--prefill-step-size` tokens per call, checking the queue between
  chunks. Any request (or control job) that arrives suspends it: what is done is committed (so
  the request can restore it), the rest resumes at the next idle wait. A request of the same
  conversation (its prompt shares the job's tokens beyond what was stored before the job)
  cancels it: what was done stays stored (finish-up-to-here), the rest is dropped.
- failures are logged and the job dropped; a request never fails over background work.

Counted in `/kvtrie/stats`: `next_turn_jobs` (started), `next_turn_tokens` (prefilled),
`next_turn_cancelled`, and `next_turn_pending` (replies waiting or running now). Off with `kvtrie serve --no-next-turn`. `KVTRIE_NEXT_TURN_CHUNK_DELAY`
(seconds, tests only) sleeps after each chunk, to make a job long enough to interrupt.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import attrs
import numpy as np

from .trie import common_prefix

logger = logging.getLogger("kvtrie.serve")

MAX_PENDING = 8  # replies waiting for their job (the oldest go first past this)
RECENT_PROMPTS = 16  # prompts remembered to tell whether a waiting reply's conversation moved on
PROBES = ("A", "Z")  # two next messages that differ in their first character


@attrs.frozen
class Reply:
    """A completed chat reply: the request's conversation and the assistant message a client sends back."""

    messages: list
    assistant: dict
    tools: Optional[list]
    template_kwargs: Optional[dict]
    role_mapping: Optional[dict]
    model_key: Any
    prompt: tuple = ()  # the request's prompt ids
    seq: int = 0  # the prompts seen before it completed
    namespace: str = "default"  # the request's cache namespace (its tenant's)


class ReplyText:
    """The reply's content and tool-call texts, split from the response stream as mlx-lm's handler does."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.state = ctx.text_sm.make_state(ctx.initial_state)
        self.prev = ctx.initial_state
        self.text = ""
        self.tool_text = ""
        self.tool_texts: list[str] = []

    def feed(self, response: Any) -> None:
        from mlx_lm.generate import TextStateMachine as sm

        if response.finish_reason == "stop":
            self.state, current = sm.discard(self.state)
            segments = [(current, "")]
        elif response.finish_reason == "length":
            self.state, segments = sm.split(self.state, response.text)
            self.state, flushed, current = sm.flush(self.state)
            segments.append((current, flushed))
        else:
            self.state, segments = sm.split(self.state, response.text)
        for current, clean in segments:
            if current == "tool":
                self.tool_text += clean
            elif current == "normal":
                if self.prev == "tool":
                    self.tool_texts.append(self.tool_text)
                    self.tool_text = ""
                self.text += clean
            self.prev = current

    def message(self, tools: Optional[list]) -> dict:
        """The assistant message as a client sends it back (reasoning left out)."""
        texts = self.tool_texts + ([self.tool_text] if self.prev == "tool" and self.tool_text else [])
        calls: list[dict[str, Any]] = []
        for text in texts:
            parsed = self.ctx.tool_parser(text, tools)
            for call in parsed if isinstance(parsed, list) else [parsed]:
                calls.append(
                    {
                        "id": call.get("id") or f"call_{len(calls)}",
                        "type": "function",
                        "function": {"name": call["name"], "arguments": call["arguments"]},
                    }
                )
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if calls:
            message["tool_calls"] = calls
        return message


def next_turn_prefix(render: Callable[[list, bool], list], messages: list, assistant: dict) -> list:
    """The tokens every next request of the conversation `messages` + `assistant` starts with:
    the common prefix of two renders followed by different probe messages (`render(messages,
    add_generation_prompt)`); the conversation rendered without a generation prompt where the
    template refuses the probes."""
    convo = [*messages, assistant]
    calls = assistant.get("tool_calls") or []
    if calls:
        probes = [
            {"role": "tool", "tool_call_id": calls[0]["id"], "name": calls[0]["function"]["name"], "content": p}
            for p in PROBES
        ]
    else:
        probes = [{"role": "user", "content": p} for p in PROBES]
    try:
        a, b = (list(render([*convo, p], True)) for p in probes)
    except Exception:  # (a template that wants something else after an assistant turn)
        return list(render(convo, False))
    return a[: common_prefix(a, b)]


@attrs.define(eq=False)
class Task:
    """A job being computed: its tokens, how many of them its reply's prompt shared, its open session (if any)."""

    tokens: np.ndarray
    base: int
    pc: Any
    model_key: Any
    namespace: str = "default"
    session: Any = None
    done: int = 0
    prefilled: int = 0
    points: list = attrs.field(factory=list)


class NextTurn:
    """The background jobs of one server: replies queue here (any thread), and the generation
    thread runs them a chunk at a time when idle (`step`), suspends them when a request comes
    (`interrupt`), and cancels them when a request of the same conversation is served (`saw_prompt`)."""

    def __init__(self, cache: Any, *, enabled: bool = True, chunk_delay: Optional[float] = None):
        self.cache = cache
        self.enabled = enabled
        self.chunk_delay = (
            float(os.environ.get("KVTRIE_NEXT_TURN_CHUNK_DELAY", 0) or 0) if chunk_delay is None else chunk_delay
        )
        self._lock = threading.Lock()
        self._pending: deque[Reply] = deque()
        self._recent: deque[tuple[int, str, np.ndarray]] = deque(maxlen=RECENT_PROMPTS)
        self._seq = 0
        self._task: Optional[Task] = None
        self._starting = False  # a reply taken from the queue, its job not yet made
        self.jobs = 0
        self.tokens = 0
        self.cancelled = 0

    def stats(self) -> dict[str, int]:
        """Jobs started, tokens prefilled, jobs cancelled; and replies waiting or running now."""
        pending = len(self._pending) + (self._task is not None or self._starting)
        return {
            "next_turn_jobs": self.jobs,
            "next_turn_tokens": self.tokens,
            "next_turn_cancelled": self.cancelled,
            "next_turn_pending": pending,
        }

    def has_work(self) -> bool:
        return self._task is not None or bool(self._pending)

    # --- any thread -------------------------------------------------------------------------

    def watch(self, ctx: Any, request: Any, args: Any, provider: Any, responses: Iterator) -> Iterator:
        """Yield `responses` unchanged; when they end (the reply is complete), queue the reply."""
        try:
            text = ReplyText(ctx)
        except Exception:
            logger.exception("next turn: cannot follow this reply")
            text = None
        if any(isinstance(m.get("content"), list) for m in request.messages if isinstance(m, dict)):
            text = None  # (images: not rendered here)
        for response in responses:
            if text is not None:
                try:
                    text.feed(response)
                except Exception:
                    logger.exception("next turn: cannot follow this reply")
                    text = None
            yield response
        if text is not None:
            try:
                self.submit(
                    Reply(
                        messages=copy.deepcopy(request.messages),
                        assistant=text.message(request.tools),
                        tools=copy.deepcopy(request.tools),
                        template_kwargs=copy.deepcopy(args.chat_template_kwargs),
                        role_mapping=request.role_mapping,
                        model_key=provider.model_key,
                        prompt=tuple(ctx.prompt),
                        namespace=getattr(args, "kvtrie_namespace", "default"),
                    )
                )
            except Exception:
                logger.exception("next turn: cannot queue this reply")

    def submit(self, reply: Reply) -> None:
        """Queue a completed reply for its job."""
        with self._lock:
            self._pending.append(attrs.evolve(reply, seq=self._seq))
            while len(self._pending) > MAX_PENDING:
                self._pending.popleft()

    # --- the generation thread ---------------------------------------------------------------

    def saw_prompt(self, tokens: Sequence[int], namespace: str = "default") -> None:
        """A request with prompt `tokens` is being served in `namespace`: cancel the job of its conversation."""
        arr = np.asarray(tokens)
        with self._lock:
            self._seq += 1
            self._recent.append((self._seq, namespace, arr))
        task = self._task
        if task is None or task.namespace != namespace or common_prefix(arr, task.tokens) <= task.base:
            return
        self.cancelled += 1
        logger.info(
            "next turn: cancelled by a request of the conversation, %d of %d tokens stored", task.done, len(task.tokens)
        )
        try:
            self._suspend(task)
        except Exception:
            logger.exception("next turn: storing a cancelled job failed")
        finally:
            self._drop()

    def interrupt(self) -> None:
        """A request is about to be served: store what the running job has done and pause it."""
        if self._task is not None:
            try:
                self._suspend(self._task)
            except Exception:
                logger.exception("next turn: storing a paused job failed")
                self._drop()

    def step(self, provider: Any) -> None:
        """Do one piece of background work: start the next job, or prefill one chunk of the current one."""
        try:
            if self._task is None:
                self._start(provider)
            else:
                self._advance(provider, self._task)
        except Exception:
            logger.exception("next turn: a background job failed")
            self._drop()
        finally:
            self._starting = False

    def _start(self, provider: Any) -> None:
        with self._lock:
            if not self._pending:
                return
            reply = self._pending.popleft()
            self._starting = True
            recent = [p for s, ns, p in self._recent if s > reply.seq and ns == reply.namespace]
        if reply.model_key != provider.model_key or provider.tokenizer is None:
            return
        tokens = np.asarray(next_turn_prefix(self._renderer(provider, reply), reply.messages, reply.assistant))
        pc = self.cache.prefix_cache(provider.model_key)
        if pc.lookup(tokens, namespace=reply.namespace) >= len(tokens):
            return
        base = common_prefix(reply.prompt, tokens)  # (a request sharing more is the conversation's next)
        if any(common_prefix(p, tokens) > base for p in recent):  # the conversation went on already
            self.cancelled += 1
            return
        self.jobs += 1
        self._task = Task(tokens, base, pc, provider.model_key, reply.namespace)

    def _renderer(self, provider: Any, reply: Reply) -> Callable[[list, bool], list]:
        tokenizer = provider.tokenizer
        args = dict(getattr(provider.cli_args, "chat_template_args", None) or {})
        args.update(reply.template_kwargs or {})

        def render(messages: list, add_generation_prompt: bool) -> list:
            from mlx_lm.server import convert_chat, process_message_content

            messages = copy.deepcopy(messages)
            if tokenizer.has_chat_template:
                process_message_content(messages)
                return list(
                    tokenizer.apply_chat_template(
                        messages, add_generation_prompt=add_generation_prompt, tools=reply.tools, tokenize=True, **args
                    )
                )
            return list(tokenizer.encode(convert_chat(messages, reply.role_mapping)))

        return render

    def _advance(self, provider: Any, task: Task) -> None:
        import mlx.core as mx

        from .layers import leaves

        n = len(task.tokens)
        if provider.model_key != task.model_key or provider.model is None:
            self._drop()
            return
        if task.session is None:
            task.session = task.pc.begin(task.tokens, namespace=task.namespace)
            task.done = task.session.cached
            task.points = [p for p in task.session.capture_at if p > task.done] + [n]
        session, point = task.session, task.points[0]
        hi = min(task.done + int(provider.cli_args.prefill_step_size), point)
        provider.model(mx.array(task.tokens[task.done : hi], dtype=mx.int32)[None], cache=session.caches)
        mx.eval([c.state for c in leaves(session.caches)])
        self.tokens += hi - task.done
        task.prefilled += hi - task.done
        task.done = hi
        if hi == point:
            task.points.pop(0)
            if hi < n:
                session.capture(hi)
        if task.done == n:
            session.commit(task.tokens)
            self._close(task)
            self._task = None
            self.cache.trim_sequences(task.pc)
            logger.info("next turn: %d tokens ready (%d prefilled in the background)", n, task.prefilled)
        if self.chunk_delay:
            time.sleep(self.chunk_delay)

    def _suspend(self, task: Task) -> None:
        """Commit what `task` has computed beyond what its session restored, and close the session."""
        session = task.session
        if session is None:
            return
        try:
            if task.done > session.cached:
                session.commit(task.tokens[: task.done])
        finally:
            self._close(task)

    def _close(self, task: Task) -> None:
        if task.session is not None:
            task.session.close()
            task.session = None

    def _drop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            try:
                self._close(task)
            except Exception:
                logger.exception("next turn: closing a dropped job's session failed")


def with_next_turn(base: type, cache: Any, *, enabled: bool = True) -> type:
    """mlx-lm's ResponseGenerator that watches its chat replies and runs their next-turn jobs in
    its idle waits (`cache`: the ServerPromptCache, which tells the jobs what requests it serves)."""
    import mlx.core as mx

    class NextTurnGenerator(base):
        def __init__(self, *args: Any, **kwargs: Any):
            # (before the base starts the generation thread, which calls _next_request)
            self.next_turn = NextTurn(cache, enabled=enabled and mx.distributed.init().size() == 1)
            cache.next_turn = self.next_turn
            super().__init__(*args, **kwargs)

        def generate(self, request: Any, generation_args: Any, progress_callback: Any = None):
            ctx, responses = super().generate(request, generation_args, progress_callback)
            if not self.next_turn.enabled or getattr(request, "request_type", None) != "chat":
                return ctx, responses
            return ctx, self.next_turn.watch(ctx, request, generation_args, self.model_provider, responses)

        def _next_request(self, timeout: Optional[float] = None):
            jobs = self.next_turn
            if timeout is None or not jobs.has_work():  # (a batch is running, or nothing to do)
                return super()._next_request(timeout)
            request = super()._next_request(None)
            if request is not None:
                jobs.interrupt()
                return request
            jobs.step(self.model_provider)
            return None

    return NextTurnGenerator
