"""The Anthropic Messages API as pure functions: validation, translation to a chat template's
message list, cache breakpoints, usage arithmetic, response and server-sent-event building.

Nothing here speaks HTTP or touches a model: `kvtrie serve` reads the body, calls
`parse_request`, renders `chat_view(request)` through the model's chat template (the
OpenAI-style message list mlx-lm's server renders), drives generation, feeds the generated
text to a `MessageAssembler` and writes what it returns. The same request renders to the same
tokens on `/v1/messages`, `/v1/messages/count_tokens` and, as an OpenAI conversation,
`/v1/chat/completions`.

Translation (Anthropic -> OpenAI-style chat messages):
- `system` (a string or text blocks) -> one `system` message, its blocks joined by "\\n".
- a user message's text blocks -> a `user` message (blocks joined by "\\n"); each `tool_result`
  block -> a `tool` message (`tool_call_id`, `name` of the matching tool_use, `content`;
  `is_error: true` prefixes the content with "Error: "). Runs of blocks keep their order.
- an assistant message's text -> `content`, its `tool_use` blocks -> `tool_calls`
  (`{"type": "function", "function": {"name", "arguments": input}}`, arguments as an object,
  as mlx-lm hands them to templates); `thinking` blocks are accepted and left out.
- `tools` -> `{"type": "function", "function": {"name", "description", "parameters": input_schema}}`.

Cache breakpoints: a block, tool or system block with `cache_control`, or the request-level
`cache_control` (automatic caching, a breakpoint at the end of the prompt). A marked block's
position is where it ends in the rendered prompt, found by rendering: the request cut right
after the block (later blocks and messages dropped; no generation prompt) is rendered and its
longest common token prefix with the full prompt is the position. A tool's position is the
smallest common prefix of the full prompt with two renders that differ right after the tool
(the tools after it dropped, and a probe tool put after it). A common prefix never reaches
past the point where the prompt depends on what follows the block, so a position is always a
prefix that a request sharing everything up to the block shares (one token short where the
tokenizer merges across the block's end). A cut that the template will not render as it is
(a system prompt alone, a conversation ending on an assistant turn) is rendered with an empty
user message after it (the position then takes in the opening of a user turn that follows
the block); a marker whose cut the template refuses either way is left out.

Usage (Anthropic's, disjoint, summing to the prompt's token count): `cache_read_input_tokens`
= tokens restored from the cache; `cache_creation_input_tokens` = tokens computed (and
stored) between the restored prefix and the last breakpoint; `input_tokens` = the rest.

Not supported (a 400 that says so): image, document and other non-text blocks, server tools, a
final assistant message to continue (prefill). Accepted, not enforced: `tool_choice` "any" and
"tool" (mlx-lm has no constrained decoding; the server makes "none" keep a one-token tool-call
marker from being sampled), `disable_parallel_tool_use`, `thinking`, unknown top-level fields.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import attrs

from .trie import common_prefix

logger = logging.getLogger("kvtrie.anthropic")

TTLS = ("5m", "1h")
MAX_BREAKPOINTS = 4  # Anthropic's limit on blocks with cache_control (the request-level one included)
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
TOOL_CHOICES = ("auto", "any", "tool", "none")
ROLES = ("user", "assistant")
BLOCK_JOIN = "\n"  # text blocks of one message (or of the system prompt) are joined by this
ERROR_PREFIX = "Error: "  # a tool_result with is_error: true is rendered with this in front
PROBE_TOOL_NAME = "kvtrie_breakpoint_probe"

# --- errors --------------------------------------------------------------------------------


class RequestError(ValueError):
    """A request the API refuses: `status` and Anthropic's error `kind` say how."""

    def __init__(self, message: str, *, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def error_body(kind: str, message: str) -> dict:
    """Anthropic's error shape: `{"type": "error", "error": {"type": kind, "message": message}}`."""
    return {"type": "error", "error": {"type": kind, "message": message}}


# --- the request as values -----------------------------------------------------------------


@attrs.frozen
class CacheControl:
    """`{"type": "ephemeral", "ttl": "5m" | "1h"}`."""

    ttl: str = "5m"


@attrs.frozen
class TextBlock:
    text: str
    cache_control: Optional[CacheControl] = None


@attrs.frozen
class ToolUseBlock:
    id: str
    name: str
    input: dict
    cache_control: Optional[CacheControl] = None


@attrs.frozen
class ToolResultBlock:
    tool_use_id: str
    content: str  # text blocks joined
    is_error: bool = False
    cache_control: Optional[CacheControl] = None


@attrs.frozen
class ThinkingBlock:
    """An assistant's earlier thinking (or redacted thinking): accepted, not rendered."""

    cache_control: Optional[CacheControl] = None


Block = Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock]


@attrs.frozen
class Message:
    role: str
    blocks: tuple  # of Block


@attrs.frozen
class Tool:
    name: str
    input_schema: dict
    description: Optional[str] = None
    cache_control: Optional[CacheControl] = None


@attrs.frozen
class ToolChoice:
    type: str = "auto"  # auto | any | tool | none
    name: Optional[str] = None
    disable_parallel_tool_use: bool = False


@attrs.frozen
class Breakpoint:
    """Where a `cache_control` marker sits: on tool `index`, on system block `index`, on block
    `block` of message `index`, or (kind "request") at the end of the prompt."""

    kind: str  # "tool" | "system" | "message" | "request"
    ttl: str
    index: int = 0
    block: int = 0


@attrs.frozen
class MessagesRequest:
    """A validated Messages (or count_tokens) request."""

    model: str
    messages: tuple  # of Message
    system: tuple = ()  # of TextBlock
    tools: tuple = ()  # of Tool
    tool_choice: Optional[ToolChoice] = None
    max_tokens: Optional[int] = None  # None for count_tokens
    stop_sequences: tuple = ()
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    user_id: Optional[str] = None
    stream: bool = False
    cache_control: Optional[CacheControl] = None  # request level: automatic caching

    @property
    def breakpoints(self) -> tuple:
        """Every cache_control marker, in prompt order (tools, system, messages, request)."""
        out = [Breakpoint("tool", t.cache_control.ttl, i) for i, t in enumerate(self.tools) if t.cache_control]
        out += [Breakpoint("system", b.cache_control.ttl, i) for i, b in enumerate(self.system) if b.cache_control]
        for i, m in enumerate(self.messages):
            out += [Breakpoint("message", b.cache_control.ttl, i, j) for j, b in enumerate(m.blocks) if b.cache_control]
        if self.cache_control is not None:
            out.append(Breakpoint("request", self.cache_control.ttl))
        return tuple(out)


# --- validation ----------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if _is_number(value) else type(value).__name__
    )


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise RequestError(message)


def parse_cache_control(value: Any, where: str) -> Optional[CacheControl]:
    """`cache_control` at `where`: None, or `{"type": "ephemeral"}` with an optional ttl "5m" | "1h"."""
    if value is None:
        return None
    _need(
        isinstance(value, dict),
        f'{where}.cache_control: expected an object like {{"type": "ephemeral"}}, got {_type_name(value)}',
    )
    _need(
        value.get("type") == "ephemeral",
        f'{where}.cache_control.type: expected "ephemeral", got {json.dumps(value.get("type"))}',
    )
    ttl = value.get("ttl", "5m")
    _need(ttl in TTLS, f'{where}.cache_control.ttl: expected "5m" or "1h", got {json.dumps(ttl)}')
    extra = set(value) - {"type", "ttl"}
    _need(not extra, f"{where}.cache_control: unknown field(s) {sorted(extra)} (allowed: type, ttl)")
    return CacheControl(ttl)


def _text_blocks(value: Any, where: str) -> tuple:
    """A string (one block) or a list of `{"type": "text", "text": ...}` blocks."""
    if isinstance(value, str):
        return (TextBlock(value),)
    _need(isinstance(value, list), f"{where}: expected a string or a list of text blocks, got {_type_name(value)}")
    out = []
    for j, block in enumerate(value):
        at = f"{where}.{j}"
        _need(isinstance(block, dict), f"{at}: expected a content block object, got {_type_name(block)}")
        _need(
            block.get("type") == "text",
            f'{at}.type: expected "text" here, got {json.dumps(block.get("type"))} (only text is supported)',
        )
        _need(isinstance(block.get("text"), str), f"{at}.text: expected a string, got {_type_name(block.get('text'))}")
        out.append(TextBlock(block["text"], parse_cache_control(block.get("cache_control"), at)))
    return tuple(out)


def _block(block: Any, role: str, where: str) -> Block:
    _need(isinstance(block, dict), f"{where}: expected a content block object, got {_type_name(block)}")
    kind = block.get("type")
    cc = parse_cache_control(block.get("cache_control"), where)
    if kind == "text":
        _need(
            isinstance(block.get("text"), str), f"{where}.text: expected a string, got {_type_name(block.get('text'))}"
        )
        return TextBlock(block["text"], cc)
    if kind == "tool_use":
        _need(role == "assistant", f"{where}: tool_use blocks belong in assistant messages, not {role}")
        for key in ("id", "name"):
            _need(isinstance(block.get(key), str) and block[key] != "", f"{where}.{key}: expected a non-empty string")
        _need(
            isinstance(block.get("input"), dict),
            f"{where}.input: expected an object (the tool's arguments), got {_type_name(block.get('input'))}",
        )
        return ToolUseBlock(block["id"], block["name"], block["input"], cc)
    if kind == "tool_result":
        _need(role == "user", f"{where}: tool_result blocks belong in user messages, not {role}")
        _need(
            isinstance(block.get("tool_use_id"), str) and block["tool_use_id"] != "",
            f"{where}.tool_use_id: expected a non-empty string (the id of the tool_use it answers)",
        )
        content = block.get("content", "")
        texts = _text_blocks(content, f"{where}.content") if content is not None else ()
        is_error = block.get("is_error", False)
        _need(
            isinstance(is_error, bool) or is_error is None,
            f"{where}.is_error: expected a boolean, got {_type_name(is_error)}",
        )
        # a cache_control inside the result's content marks the result (its text is rendered whole)
        inner = next((b.cache_control for b in reversed(texts) if b.cache_control), None)
        return ToolResultBlock(
            block["tool_use_id"], BLOCK_JOIN.join(b.text for b in texts), bool(is_error), cc or inner
        )
    if kind in ("thinking", "redacted_thinking"):
        _need(role == "assistant", f"{where}: {kind} blocks belong in assistant messages, not {role}")
        return ThinkingBlock(cc)
    raise RequestError(
        f"{where}.type: content blocks of type {json.dumps(kind)} are not supported by kvtrie serve "
        "(supported: text, tool_use, tool_result, thinking)"
    )


def _messages(value: Any) -> tuple:
    _need(isinstance(value, list), f"messages: expected a list of messages, got {_type_name(value)}")
    _need(len(value) > 0, "messages: at least one message is required")
    out: list[Message] = []
    for i, m in enumerate(value):
        where = f"messages.{i}"
        _need(isinstance(m, dict), f"{where}: expected a message object, got {_type_name(m)}")
        role = m.get("role")
        if role == "system":
            raise RequestError(
                f'{where}.role: "system" is not a message role here; pass the system prompt as the top-level "system" field'
            )
        _need(role in ROLES, f'{where}.role: expected "user" or "assistant", got {json.dumps(role)}')
        content = m.get("content")
        if isinstance(content, str):
            blocks: tuple = (TextBlock(content),)
        else:
            _need(
                isinstance(content, list) and len(content) > 0,
                f"{where}.content: expected a string or a non-empty list of content blocks, got "
                + ("an empty list" if content == [] else _type_name(content)),
            )
            blocks = tuple(_block(b, role, f"{where}.content.{j}") for j, b in enumerate(content))
        if any(isinstance(b, ToolResultBlock) for b in blocks):
            before = out[-1] if out else None
            ids = (
                {b.id for b in before.blocks if isinstance(b, ToolUseBlock)}
                if before and before.role == "assistant"
                else set()
            )
            for j, b in enumerate(blocks):
                if isinstance(b, ToolResultBlock) and b.tool_use_id not in ids:
                    raise RequestError(
                        f"{where}.content.{j}.tool_use_id: {json.dumps(b.tool_use_id)} answers no tool_use block "
                        "of the assistant message just before it"
                    )
        out.append(Message(role, blocks))
    _need(
        out[-1].role == "user",
        "messages: the last message must be a user message (continuing a prefilled assistant turn is not supported)",
    )
    return tuple(out)


def _tools(value: Any) -> tuple:
    if value is None:
        return ()
    _need(isinstance(value, list), f"tools: expected a list of tools, got {_type_name(value)}")
    out, names = [], set()
    for k, tool in enumerate(value):
        where = f"tools.{k}"
        _need(isinstance(tool, dict), f"{where}: expected a tool object, got {_type_name(tool)}")
        _need(
            tool.get("type") in (None, "custom"),
            f"{where}.type: {json.dumps(tool.get('type'))} tools (server tools) are not supported; define a custom tool "
            "with name, description and input_schema",
        )
        name = tool.get("name")
        _need(
            isinstance(name, str) and TOOL_NAME.match(name) is not None,
            f"{where}.name: expected 1-128 letters, digits, '_' or '-', got {json.dumps(name)}",
        )
        _need(name not in names, f"{where}.name: {json.dumps(name)} is defined twice; tool names must be unique")
        names.add(name)
        description = tool.get("description")
        _need(description is None or isinstance(description, str), f"{where}.description: expected a string")
        schema = tool.get("input_schema")
        _need(
            isinstance(schema, dict), f"{where}.input_schema: expected a JSON schema object, got {_type_name(schema)}"
        )
        out.append(Tool(name, schema, description, parse_cache_control(tool.get("cache_control"), where)))
    return tuple(out)


def _tool_choice(value: Any, tools: tuple) -> Optional[ToolChoice]:
    if value is None:
        return None
    _need(isinstance(value, dict), f'tool_choice: expected an object like {{"type": "auto"}}, got {_type_name(value)}')
    kind = value.get("type")
    _need(kind in TOOL_CHOICES, f"tool_choice.type: expected one of {', '.join(TOOL_CHOICES)}, got {json.dumps(kind)}")
    parallel = value.get("disable_parallel_tool_use", False)
    _need(isinstance(parallel, bool), "tool_choice.disable_parallel_tool_use: expected a boolean")
    name = value.get("name")
    if kind == "tool":
        _need(
            isinstance(name, str) and any(t.name == name for t in tools),
            f"tool_choice.name: expected the name of one of the request's tools, got {json.dumps(name)}",
        )
    if kind in ("any", "tool"):
        _need(len(tools) > 0, f"tool_choice: type {json.dumps(kind)} needs tools in the request")
    return ToolChoice(kind, name if kind == "tool" else None, parallel)


def _optional_number(body: dict, key: str, lo: float, hi: float) -> Optional[float]:
    value = body.get(key)
    if value is None:
        return None
    _need(
        _is_number(value) and lo <= value <= hi,
        f"{key}: expected a number from {lo:g} to {hi:g}, got {json.dumps(value)}",
    )
    return float(value)


def parse_request(body: Any, *, count_only: bool = False) -> MessagesRequest:
    """Validate a Messages request body (`count_only`: a count_tokens body, no `max_tokens`) into
    a `MessagesRequest`; raises `RequestError` saying which field is wrong and what it expects."""
    _need(isinstance(body, dict), f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    _need(isinstance(model, str) and model != "", "model: expected a non-empty string (the model's name)")
    max_tokens = None
    if not count_only:
        max_tokens = body.get("max_tokens")
        _need("max_tokens" in body, "max_tokens: field required (the most tokens to generate, an integer > 0)")
        _need(
            _is_int(max_tokens) and max_tokens > 0, f"max_tokens: expected an integer > 0, got {json.dumps(max_tokens)}"
        )
    _need("messages" in body, "messages: field required")
    messages = _messages(body["messages"])
    system = body.get("system")
    system_blocks = () if system is None else _text_blocks(system, "system")
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    stop = body.get("stop_sequences")
    if stop is None:
        stop = []
    _need(
        isinstance(stop, list) and all(isinstance(s, str) and s != "" for s in stop),
        f"stop_sequences: expected a list of non-empty strings, got {json.dumps(stop)}",
    )
    top_k = body.get("top_k")
    _need(top_k is None or (_is_int(top_k) and top_k >= 0), f"top_k: expected an integer >= 0, got {json.dumps(top_k)}")
    stream = body.get("stream", False)
    _need(isinstance(stream, bool) or stream is None, f"stream: expected a boolean, got {json.dumps(stream)}")
    metadata = body.get("metadata")
    _need(metadata is None or isinstance(metadata, dict), f"metadata: expected an object, got {_type_name(metadata)}")
    user_id = (metadata or {}).get("user_id")
    _need(user_id is None or isinstance(user_id, str), "metadata.user_id: expected a string")
    request = MessagesRequest(
        model=model,
        messages=messages,
        system=system_blocks,
        tools=tools,
        tool_choice=tool_choice,
        max_tokens=max_tokens,
        stop_sequences=tuple(stop),
        temperature=_optional_number(body, "temperature", 0.0, 1.0),
        top_p=_optional_number(body, "top_p", 0.0, 1.0),
        top_k=top_k,
        user_id=user_id,
        stream=bool(stream),
        cache_control=parse_cache_control(body.get("cache_control"), "request"),
    )
    n = len(request.breakpoints)
    _need(n <= MAX_BREAKPOINTS, f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {n}.")
    return request


# --- translation to the chat template's message list ---------------------------------------


@attrs.frozen
class ChatView:
    """A request as mlx-lm's server renders it: OpenAI-style messages and tools."""

    messages: list
    tools: Optional[list]


def _tool_names(messages: Sequence[Message]) -> dict:
    return {b.id: b.name for m in messages for b in m.blocks if isinstance(b, ToolUseBlock)}


def chat_messages(request: MessagesRequest) -> list:
    """The OpenAI-style message list for `request` (fresh dicts: templates and mlx-lm may edit them)."""
    out: list[dict] = []
    if request.system:
        out.append({"role": "system", "content": BLOCK_JOIN.join(b.text for b in request.system)})
    names = _tool_names(request.messages)
    for m in request.messages:
        if m.role == "assistant":
            text = BLOCK_JOIN.join(b.text for b in m.blocks if isinstance(b, TextBlock))
            calls = [
                {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": dict(b.input)}}
                for b in m.blocks
                if isinstance(b, ToolUseBlock)
            ]
            msg: dict = {"role": "assistant", "content": text}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        texts: list[str] = []
        for b in m.blocks:
            if isinstance(b, ToolResultBlock):
                if texts:
                    out.append({"role": "user", "content": BLOCK_JOIN.join(texts)})
                    texts = []
                tool_msg = {
                    "role": "tool",
                    "tool_call_id": b.tool_use_id,
                    "content": (ERROR_PREFIX + b.content) if b.is_error else b.content,
                }
                if b.tool_use_id in names:
                    tool_msg["name"] = names[b.tool_use_id]
                out.append(tool_msg)
            elif isinstance(b, TextBlock):
                texts.append(b.text)
        if texts:
            out.append({"role": "user", "content": BLOCK_JOIN.join(texts)})
    return out


def chat_tools(tools: Sequence[Tool]) -> Optional[list]:
    """Tools in OpenAI's function form (None when there are none, as mlx-lm passes them)."""
    if not tools:
        return None
    out = []
    for t in tools:
        function: dict = {"name": t.name}
        if t.description is not None:
            function["description"] = t.description
        function["parameters"] = t.input_schema
        out.append({"type": "function", "function": function})
    return out


def chat_view(request: MessagesRequest) -> ChatView:
    """The messages and tools that the model's chat template renders for `request`."""
    return ChatView(chat_messages(request), chat_tools(request.tools))


# --- breakpoint positions ------------------------------------------------------------------

# render(messages, tools, add_generation_prompt) -> token ids, through the model's chat template
Render = Callable[[list, Optional[list], bool], Sequence[int]]


def _cut(request: MessagesRequest, bp: Breakpoint) -> list:
    """The requests whose renders differ from `request`'s right after breakpoint `bp`."""
    if bp.kind == "tool":
        probe = Tool(PROBE_TOOL_NAME, {"type": "object", "properties": {}}, "")
        head = request.tools[: bp.index + 1]
        return [attrs.evolve(request, tools=head), attrs.evolve(request, tools=head + (probe,))]
    if bp.kind == "system":
        return [attrs.evolve(request, system=request.system[: bp.index + 1], messages=())]
    message = request.messages[bp.index]
    head = request.messages[: bp.index] + (Message(message.role, message.blocks[: bp.block + 1]),)
    return [attrs.evolve(request, messages=head)]


def _render_cut(request: MessagesRequest, render: Render) -> Sequence[int]:
    view = chat_view(request)
    try:
        return render(view.messages, view.tools, False)
    except Exception:
        # a template that will not end on this turn (a system prompt alone, an assistant turn):
        # an empty user turn after it changes nothing before the cut
        return render(view.messages + [{"role": "user", "content": ""}], view.tools, False)


def breakpoint_positions(request: MessagesRequest, prompt: Sequence[int], render: Render) -> tuple:
    """`(position, ttl)` per breakpoint of `request`, sorted and distinct (a position marked with
    both TTLs keeps "1h"): where each marked block ends in `prompt` (its rendered token ids).
    A marker whose cut the template cannot render at all is left out (and logged)."""
    found: dict[int, str] = {}
    for bp in request.breakpoints:
        if bp.kind == "request":
            position = len(prompt)
        else:
            ends, error = [], None
            for cut in _cut(request, bp):
                try:
                    ends.append(common_prefix(prompt, _render_cut(cut, render)))
                except Exception as exc:
                    error = exc
            if not ends:
                logger.warning(
                    "cache_control on %s %d: the chat template cannot render the prompt up to it (%s); ignored",
                    bp.kind,
                    bp.index,
                    error,
                )
                continue
            position = min(ends)
        if found.get(position) != "1h":
            found[position] = bp.ttl
    return tuple(sorted(found.items()))


# --- usage ---------------------------------------------------------------------------------


@attrs.frozen
class Usage:
    """Anthropic's usage: the prompt's tokens split three ways (disjoint), and the output's."""

    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    output_tokens: int
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def to_dict(self) -> dict:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.ephemeral_5m_input_tokens,
                "ephemeral_1h_input_tokens": self.ephemeral_1h_input_tokens,
            },
            "output_tokens": self.output_tokens,
        }


def usage_for(prompt_tokens: int, cached: int, breakpoints: Sequence, output_tokens: int) -> Usage:
    """Usage of a request whose prompt has `prompt_tokens` tokens, `cached` of them restored, with
    `(position, ttl)` breakpoints: the tokens computed up to the last breakpoint were created in the
    cache (each run credited to the TTL of the breakpoint that closes it), the rest are input."""
    if not 0 <= cached <= prompt_tokens:
        raise ValueError(f"cached tokens must be within the prompt (0..{prompt_tokens}), got {cached}")
    by_ttl = {ttl: 0 for ttl in TTLS}
    done = cached
    for position, ttl in sorted(breakpoints):
        position = min(position, prompt_tokens)
        if position > done:
            by_ttl[ttl] += position - done
            done = position
    created = by_ttl["5m"] + by_ttl["1h"]
    return Usage(
        input_tokens=prompt_tokens - cached - created,
        cache_creation_input_tokens=created,
        cache_read_input_tokens=cached,
        output_tokens=output_tokens,
        ephemeral_5m_input_tokens=by_ttl["5m"],
        ephemeral_1h_input_tokens=by_ttl["1h"],
    )


# --- responses and events ------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A fresh id like Anthropic's: `msg_...`, `toolu_...`, `req_...`."""
    return f"{prefix}_{uuid.uuid4().hex}"


def message_body(
    message_id: str, model: str, content: list, stop_reason: Optional[str], stop_sequence: Optional[str], usage: Usage
) -> dict:
    """A Messages response: `{"id", "type": "message", "role": "assistant", "model", "content", ...}`."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage.to_dict(),
    }


def message_start(message_id: str, model: str, usage: Usage) -> dict:
    """The stream's first event: the message with no content yet and the usage so far."""
    return {"type": "message_start", "message": message_body(message_id, model, [], None, None, usage)}


def message_delta(stop_reason: Optional[str], stop_sequence: Optional[str], usage: Usage) -> dict:
    """The stream's closing delta: why it stopped and the final usage (output tokens included)."""
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
        "usage": usage.to_dict(),
    }


MESSAGE_STOP = {"type": "message_stop"}
PING = {"type": "ping"}


def sse(event: dict) -> bytes:
    """One server-sent event: `event: TYPE\\ndata: JSON\\n\\n`."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def count_tokens_body(n: int) -> dict:
    """The count_tokens response."""
    return {"input_tokens": n}


class MessageAssembler:
    """Generated text -> Anthropic content blocks, as stream events and as the final content.

    It runs mlx-lm's text state machine (`text_sm`, duck-typed: `make_state`, `split`, `flush`,
    `discard`) over each generated piece, as mlx-lm's OpenAI handler does: "normal" text becomes
    text blocks, "reasoning" text thinking blocks, and each tool call (the text between the
    tokenizer's tool-call markers, parsed by `tool_parser(text, tools)`) a `tool_use` block with a
    fresh `toolu_` id. A call that does not parse is logged and dropped, as on the OpenAI path.
    """

    def __init__(
        self,
        text_sm: Any,
        initial_state: str = "normal",
        *,
        tool_parser: Optional[Callable] = None,
        tools: Optional[list] = None,
        eos_ids: Sequence[int] = (),
        stop_words: Optional[dict] = None,
    ):
        self._sm = text_sm
        self._state = text_sm.make_state(initial_state)
        self._prev = initial_state
        self._parser = tool_parser
        self._tools = tools
        self._eos = set(eos_ids)
        self._stop_words = dict(stop_words or {})  # stop sequence -> its token ids
        self._tool_text = ""
        self._open: Optional[str] = None  # the type of the block being streamed
        self.content: list = []
        self.tokens: list = []
        self.finish_reason: Optional[str] = None
        self.made_tool_call = False

    @property
    def output_tokens(self) -> int:
        return len(self.tokens)

    def feed(self, text: str, token: int, finish_reason: Optional[str] = None) -> list:
        """One generated token (and the text it decoded to): the stream events it completes."""
        sm = self._sm
        if finish_reason == "stop":
            self._state, current = sm.discard(self._state)
            segments = [(current, "")]
        elif finish_reason == "length":
            self._state, segments = sm.split(self._state, text)
            self._state, flushed, current = sm.flush(self._state)
            segments.append((current, flushed))
        else:
            self._state, segments = sm.split(self._state, text)
        self.tokens.append(token)
        if finish_reason is not None:
            self.finish_reason = finish_reason
        events: list = []
        for state, piece in segments:
            if state == "tool":
                self._tool_text += piece
            else:
                if self._prev == "tool":
                    events += self._tool_calls()
                if state == "reasoning":
                    events += self._text("thinking", piece)
                elif state is not None:
                    events += self._text("text", piece)
            self._prev = state
        return events

    def close(self) -> list:
        """The events that end the content (a tool call cut off at the end, the open block)."""
        events: list = []
        if self._prev == "tool" and self._tool_text:
            events += self._tool_calls()
        events += self._close_block()
        return events

    @property
    def stop_sequence(self) -> Optional[str]:
        """The stop sequence the generation ended on (None for an end of turn or a length stop)."""
        if self.finish_reason != "stop" or not self.tokens or self.tokens[-1] in self._eos:
            return None
        matches = [
            w
            for w, ids in self._stop_words.items()
            if ids and len(ids) <= len(self.tokens) and tuple(self.tokens[-len(ids) :]) == tuple(ids)
        ]
        return max(matches, key=len, default=None)

    @property
    def stop_reason(self) -> str:
        """end_turn | max_tokens | stop_sequence | tool_use."""
        if self.finish_reason == "length":
            return "max_tokens"
        if self.stop_sequence is not None:
            return "stop_sequence"
        return "tool_use" if self.made_tool_call else "end_turn"

    # --- blocks ---

    def _close_block(self) -> list:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]

    def _text(self, kind: str, piece: str) -> list:
        if not piece:
            return []
        events: list = []
        key, delta = ("text", "text_delta") if kind == "text" else ("thinking", "thinking_delta")
        if self._open != kind:
            events += self._close_block()
            block = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            self.content.append(block)
            self._open = kind
            events.append({"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)})
        self.content[-1][key] += piece
        events.append(
            {"type": "content_block_delta", "index": len(self.content) - 1, "delta": {"type": delta, key: piece}}
        )
        return events

    def _tool_calls(self) -> list:
        text, self._tool_text = self._tool_text, ""
        events: list = []
        for call in self._parse(text):
            events += self._close_block()
            block = {"type": "tool_use", "id": new_id("toolu"), "name": call["name"], "input": call["arguments"]}
            self.content.append(block)
            index = len(self.content) - 1
            events.append({"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}})
            events.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {
                        "type": "input_json_delta",
                        "partial_json": json.dumps(block["input"], ensure_ascii=False),
                    },
                }
            )
            events.append({"type": "content_block_stop", "index": index})
            self.made_tool_call = True
        return events

    def _parse(self, text: str) -> list:
        if self._parser is None:
            return []
        try:
            parsed = self._parser(text, self._tools)
        except Exception as exc:  # a call cut off by max_tokens, or not the template's format
            logger.warning("a tool call did not parse (%s: %s); dropped", type(exc).__name__, exc)
            return []
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            args = call.get("arguments") if isinstance(call, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    args = None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(args, dict):
                logger.warning("a tool call parsed to %r, not a name and an arguments object; dropped", call)
                continue
            calls.append({"name": call["name"], "arguments": args})
        return calls
