"""`POST /v1/messages` and `POST /v1/messages/count_tokens` on `kvtrie serve`: the HTTP side.

The protocol (validation, translation, breakpoints, usage, events) is `kvtrie.anthropic`; this
module reads the body, renders the conversation through the model's chat template exactly as
mlx-lm's server does, notes the cache breakpoints with the prompt cache, drives generation
through mlx-lm's `ResponseGenerator` (the queue every request of the server goes through, so
both APIs share one cache and one batch) and writes Anthropic-shaped JSON or server-sent events.

Every request is served by the server's `--model` (the `model` field is echoed back, so clients
that send their own model names work); a server started without `--model` answers 404.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Optional

from . import anthropic as api
from . import guard

logger = logging.getLogger("kvtrie.serve")

ROUTES = {"/v1/messages": False, "/v1/messages/count_tokens": True}  # path -> count tokens only
LOAD_WAIT_SECONDS = 600.0  # how long a request waits for the model to finish loading
BAN = -1e9  # the logit bias that keeps a token from being sampled


class ChatRenderer:
    """Token ids of an OpenAI-style conversation, rendered as mlx-lm's server renders them
    (`ResponseGenerator._tokenize`): the chat template with `--chat-template-args`, or mlx-lm's
    plain `convert_chat` for a tokenizer without a template (tools are then left out)."""

    def __init__(self, tokenizer: Any, template_args: Optional[dict] = None):
        self.tokenizer = tokenizer
        self.template_args = dict(template_args or {})

    def __call__(self, messages: list, tools: Optional[list], add_generation_prompt: bool = True) -> list:
        tok = self.tokenizer
        if tok.has_chat_template:
            return list(
                tok.apply_chat_template(
                    copy.deepcopy(messages),
                    add_generation_prompt=add_generation_prompt,
                    tools=tools,
                    tokenize=True,
                    **self.template_args,
                )
            )
        from mlx_lm.server import convert_chat

        return list(tok.encode(convert_chat(messages)))


def chat_renderer(generator: Any, timeout: float = LOAD_WAIT_SECONDS) -> ChatRenderer:
    """The renderer of the server's model, once it has loaded (404 when the server has no model)."""
    provider = generator.model_provider
    if provider.cli_args.model is None:
        raise api.RequestError(
            "this server has no model to serve: start kvtrie serve with --model PATH",
            status=404,
            kind="not_found_error",
        )
    deadline = time.monotonic() + timeout
    while provider.tokenizer is None:
        if not generator.generation_available():
            raise RuntimeError("the model failed to load; see the server's log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the model is still loading after {timeout:.0f} s")
        time.sleep(0.05)
    return ChatRenderer(provider.tokenizer, provider.cli_args.chat_template_args)


def serve(handler: Any, cache: Any, *, count_only: bool) -> None:
    """Answer one Messages (or count_tokens) request on `handler` (mlx-lm's APIHandler).
    Bad input gets a 400 in Anthropic's error shape before anything reaches the cache (the body
    as `kvtrie.guard` admitted it, the prompt within its limits)."""
    limits = getattr(handler, "kvtrie_limits", None)
    try:
        request = api.parse_request(_read_body(handler), count_only=count_only)
        if limits is not None:
            check_limits(request, limits)
        render = chat_renderer(handler.response_generator)
        view = api.chat_view(request)
        try:
            prompt = render(view.messages, view.tools, True)
        except Exception as exc:  # the template refuses the conversation (roles, order, content)
            raise api.RequestError(f"the model's chat template cannot render these messages: {exc}") from None
        if limits is not None and not count_only and len(prompt) > limits.max_prompt_tokens:
            raise api.RequestError(
                f"prompt is too long: {len(prompt)} tokens > {limits.max_prompt_tokens} maximum (--max-prompt-tokens)"
            )
        breakpoints = () if count_only else api.breakpoint_positions(request, prompt, render)
    except api.RequestError as exc:
        return send_error(handler, exc.status, exc.kind, str(exc))
    except Exception as exc:
        logger.exception("messages: preparing the request failed")
        return send_error(handler, 500, "api_error", f"the server could not prepare the request: {exc}")
    if count_only:
        return send_json(handler, 200, api.count_tokens_body(len(prompt)))
    cache.note_breakpoints(
        prompt,
        [p for p, _ in breakpoints],
        [t for _, t in breakpoints],
        getattr(handler, "kvtrie_namespace", "default"),
    )
    _generate(handler, request, prompt, breakpoints)


# --- writing -------------------------------------------------------------------------------


def send_json(handler: Any, status: int, body: dict) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    handler._set_completion_headers(status)
    handler.send_header("Content-Length", str(len(data)))
    handler.send_header("request-id", api.new_id("req"))
    handler.end_headers()
    handler.wfile.write(data)
    handler.wfile.flush()


def send_error(handler: Any, status: int, kind: str, message: str) -> None:
    send_json(handler, status, api.error_body(kind, message))


def check_limits(request: api.MessagesRequest, limits: guard.Limits) -> None:
    """What the model bounds: `max_tokens` within its context, `top_k` below its vocabulary (past
    it mlx-lm's sampler raises on the generation thread, which dies)."""
    if request.max_tokens is not None and request.max_tokens > limits.max_output_tokens:
        raise api.RequestError(
            f"max_tokens: {request.max_tokens} > {limits.max_output_tokens}, the most this model can generate"
        )
    vocab = limits.model_info().vocab_size
    if request.top_k is not None and vocab is not None and request.top_k >= vocab:
        raise api.RequestError(f"top_k: expected an integer below the vocabulary size ({vocab}), got {request.top_k}")


def _read_body(handler: Any) -> Any:
    body = getattr(handler, "kvtrie_body", None)
    if body is not None:  # (read once, within --max-request-bytes, by kvtrie.guard)
        return body
    length = handler.headers.get("Content-Length")
    try:
        n = int(length)
    except (TypeError, ValueError):
        raise api.RequestError(f"a Content-Length header with the body's size is required, got {length!r}") from None
    raw = handler.rfile.read(n)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise api.RequestError(f"the request body is not valid JSON: {exc}") from None


# --- generation ----------------------------------------------------------------------------


def _generation_arguments(request: api.MessagesRequest, generator: Any, tokenizer: Any) -> Any:
    import mlx_lm.server as server

    cli = generator.cli_args
    assert request.max_tokens is not None  # (only a count_tokens request has none, and it generates nothing)
    logit_bias = None
    if request.tool_choice is not None and request.tool_choice.type == "none" and tokenizer.has_tool_calling:
        start = tokenizer.encode(tokenizer.tool_call_start, add_special_tokens=False)
        if len(start) == 1:  # a one-token tool-call marker can be kept from being sampled
            logit_bias = {start[0]: BAN}
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return server.GenerationArguments(
        # (mlx-lm passes adapter=None itself; its annotation says str)
        model=server.ModelDescription(model="default_model", draft="default_model", adapter=None),  # type: ignore[arg-type]
        sampling=server.SamplingArguments(
            temperature=pick(request.temperature, cli.temp),
            top_p=pick(request.top_p, cli.top_p),
            top_k=pick(request.top_k, cli.top_k),
            min_p=cli.min_p,
            xtc_probability=0.0,
            xtc_threshold=0.1,
        ),
        logits=server.LogitsProcessorArguments(
            logit_bias=logit_bias,
            repetition_penalty=0.0,
            repetition_context_size=20,
            presence_penalty=0.0,
            presence_context_size=20,
            frequency_penalty=0.0,
            frequency_context_size=20,
        ),
        stop_words=list(request.stop_sequences),
        max_tokens=request.max_tokens,
        num_draft_tokens=cli.num_draft_tokens,
        logprobs=False,
        top_logprobs=-1,
        seed=None,
        chat_template_kwargs=None,
    )


def _generate(handler: Any, request: api.MessagesRequest, prompt: Sequence[int], breakpoints: Sequence) -> None:
    import mlx_lm.server as server

    generator = handler.response_generator
    tokenizer = generator.model_provider.tokenizer
    view = api.chat_view(request)
    completion = server.CompletionRequest("chat", "", view.messages, view.tools, None)
    args = _generation_arguments(request, generator, tokenizer)
    message_id = api.new_id("msg")
    stream = request.stream
    started = False  # message_start sent

    def write(events: list) -> None:
        for event in events:
            handler.wfile.write(api.sse(event))
        handler.wfile.flush()

    def progress(done: int, total: int) -> None:  # keep the connection alive through a long prefill
        if stream:
            handler.wfile.write(api.sse(api.PING) if started else f": prefill {done}/{total}\n\n".encode())
            handler.wfile.flush()

    try:
        ctx, responses = generator.generate(completion, args, progress_callback=progress)
    except guard.Refusal as refusal:  # the generation thread refused the prompt
        return send_error(handler, refusal.rejected.status, "invalid_request_error", refusal.rejected.message)
    except Exception as exc:
        logger.exception("messages: generation could not start")
        return send_error(handler, 500, "api_error", f"generation could not start: {exc}")
    if list(ctx.prompt) != list(prompt):
        logger.warning(
            "messages: the generation thread rendered %d prompt tokens, this request %d "
            "(was another model loaded?); usage follows the generation's",
            len(ctx.prompt),
            len(prompt),
        )
    assembler = api.MessageAssembler(
        ctx.text_sm,
        ctx.initial_state,
        tool_parser=ctx.tool_parser if ctx.has_tool_calling else None,
        tools=view.tools,
        eos_ids=tokenizer.eos_token_ids,
        stop_words={w: tuple(tokenizer.encode(w, add_special_tokens=False)) for w in request.stop_sequences},
    )

    def usage() -> api.Usage:
        cached = min(max(ctx.prompt_cache_count, 0), len(ctx.prompt))
        return api.usage_for(len(ctx.prompt), cached, breakpoints, assembler.output_tokens)

    headers_sent = False
    try:
        if stream:
            handler._set_stream_headers(200)
            handler.send_header("request-id", api.new_id("req"))
            handler.end_headers()
            headers_sent = True
            if ctx.prompt_cache_count >= 0:  # known at once on the batched path
                write([api.message_start(message_id, request.model, usage())])
                started = True
        for gen in responses:
            events = assembler.feed(gen.text, gen.token, gen.finish_reason)
            if stream:
                if not started:
                    write([api.message_start(message_id, request.model, usage())])
                    started = True
                write(events)
        events = assembler.close()
        final = usage()
        if stream:
            if not started:
                events.insert(0, api.message_start(message_id, request.model, final))
            write(events + [api.message_delta(assembler.stop_reason, assembler.stop_sequence, final), api.MESSAGE_STOP])
        else:
            body = api.message_body(
                message_id, request.model, assembler.content, assembler.stop_reason, assembler.stop_sequence, final
            )
            send_json(handler, 200, body)
        logger.info(
            "messages %s: %d prompt tokens (%d read from the cache, %d written, %d input), %d output, %s%s",
            message_id,
            final.prompt_tokens,
            final.cache_read_input_tokens,
            final.cache_creation_input_tokens,
            final.input_tokens,
            final.output_tokens,
            assembler.stop_reason,
            f", user {request.user_id}" if request.user_id else "",
        )
    except (BrokenPipeError, ConnectionResetError):
        logger.info("messages %s: the client went away", message_id)
    except Exception as exc:
        logger.exception("messages %s: generation failed", message_id)
        try:
            if headers_sent:
                write([{"type": "error", "error": {"type": "api_error", "message": f"generation failed: {exc}"}}])
            else:
                send_error(handler, 500, "api_error", f"generation failed: {exc}")
        except OSError:
            pass
    finally:
        ctx.stop()
