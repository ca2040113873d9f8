"""Serve several interleaved conversations that share a system prompt through one PrefixCache.

Each turn's prompt is the whole conversation so far (system prompt, earlier turns and
the replies the model actually generated), so without a cache every turn recomputes
everything; with kvtrie each turn only prefills what is new. Prints one row per turn
and a summary. Runs offline on the bundled tiny model by default.

    python examples/multi_conversation.py [--model tiny-llama|tiny-qwen3-next|PATH]
    python examples/multi_conversation.py --replay-on tiny-qwen3-next   # same tokens, second model
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time

import mlx.core as mx
from tqdm import tqdm

from kvtrie import PrefixCache
from kvtrie.models import ChatTemplate, Conversation, Sampler, generate, load_model, model_fingerprint

SYSTEM = (
    "You are kvtrie's demo assistant. You answer questions about caching, memory and "
    "inference servers briefly and precisely. Every conversation in this demo shares this "
    "system prompt, so its attention state is computed once and reused by all of them. "
    "Rules: be concise; cite numbers when you have them; say when you do not know; never "
    "invent measurements; prefer short sentences; keep code samples minimal and runnable. "
) * 2

WORDS = (
    "cache prefix token memory budget page host device trie branch eviction latency "
    "prompt reply model layer state restore commit session reuse server request"
).split()


def user_message(rng: random.Random, conv: int, turn: int) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
    return f"[user {conv}, turn {turn}] Tell me about {words}?"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help="tiny-llama, tiny-qwen3-next, or a local HF directory")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=48, help="reply length limit")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prefill-step", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-mb", type=float, help="device-memory budget for cached payloads (default unlimited)")
    p.add_argument("--host-mb", type=float, help="host-memory budget for paged-out payloads (default unlimited)")
    p.add_argument("--disk-dir", help="a disk tier in this directory: a second run starts warm from it")
    p.add_argument("--disk-mb", type=float, help="disk budget (default unlimited)")
    p.add_argument("--replay-on", metavar="MODEL", help="replay the same requests (prompts and replies) on a second model and compare prefill")
    p.add_argument("--verbose", action="store_true", help="debug logging of per-request cache decisions")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    model, tokenizer = load_model(args.model, seed=args.seed)
    template = ChatTemplate(tokenizer)
    cache = PrefixCache(
        model.make_cache,
        namespace=args.model,
        device_bytes=None if args.device_mb is None else int(args.device_mb * 2**20),
        host_bytes=None if args.host_mb is None else int(args.host_mb * 2**20),
        disk_dir=args.disk_dir,
        disk_bytes=None if args.disk_mb is None else int(args.disk_mb * 2**20),
        fingerprint=model_fingerprint(model) if args.disk_dir else None,
    )
    if args.disk_dir:
        print(f"disk tier {args.disk_dir}: {cache.stats()['disk_bytes'] / 2**20:.2f} MB from an earlier run")
    rng = random.Random(args.seed)
    convs = [Conversation(template, system=SYSTEM) for _ in range(args.conversations)]
    last_seen = [0] * args.conversations  # prompt + reply tokens at the end of the previous turn

    header = f"{'conv':>4} {'turn':>4} {'prompt':>7} {'cached':>7} {'prefill':>7} {'ttft ms':>8} {'tok/s':>7} {'disk':>5} {'dev MB':>7} {'host MB':>7} {'mlx MB':>7}  check"
    print(f"model {args.model}: {args.conversations} conversations x {args.turns} turns, system prompt {len(template.render([{'role': 'system', 'content': SYSTEM}], False))} tokens")
    print(header)
    print("-" * len(header))
    total_prompt = total_cached = total_prefill = 0
    failed_checks = 0
    trace: list[tuple[list[int], list[int], list[int]]] = []
    peak_device = 0
    started = time.perf_counter()
    with tqdm(total=args.conversations * args.turns, desc="turns", leave=False, file=sys.stderr) as bar:
        for turn in range(args.turns):
            for i, conv in enumerate(convs):
                conv.add_user(user_message(rng, i, turn))
                prompt = conv.prompt()
                sampler = Sampler(temperature=args.temperature, seed=args.seed * 1000 + i * 100 + turn)
                from_disk = cache.stats()["cached_tokens_disk"]
                result = generate(
                    model,
                    cache,
                    prompt,
                    max_tokens=args.max_tokens,
                    sampler=sampler,
                    stop_tokens=sorted(tokenizer.eos_ids),
                    prefill_step_size=args.prefill_step,
                    capture_hints=conv.boundaries,
                )
                trace.append((prompt, result.tokens, conv.boundaries))
                ok = turn == 0 or result.cached_tokens >= last_seen[i] - 1
                failed_checks += not ok
                conv.add_reply(result.tokens)
                last_seen[i] = len(prompt) + len(result.tokens)
                total_prompt += result.prompt_tokens
                total_cached += result.cached_tokens
                total_prefill += result.prefill_tokens
                stats = cache.stats()
                from_disk = stats["cached_tokens_disk"] - from_disk
                peak_device = max(peak_device, stats["device_bytes"])
                tqdm.write(
                    f"{i:>4} {turn:>4} {result.prompt_tokens:>7} {result.cached_tokens:>7} {result.prefill_tokens:>7} "
                    f"{result.ttft_s * 1e3:>8.1f} {result.decode_tokens_per_s:>7.0f} {from_disk:>5} {stats['device_bytes'] / 2**20:>7.2f} "
                    f"{stats['host_bytes'] / 2**20:>7.2f} "
                    f"{mx.get_active_memory() / 2**20:>7.1f}  {'ok' if ok else 'MISS'}"
                )
                bar.update()
    elapsed = time.perf_counter() - started
    stats = cache.stats()
    print("-" * len(header))
    print(
        f"token-weighted hit rate {total_cached / total_prompt:.1%}: {total_cached} of {total_prompt} prompt tokens "
        f"restored, {total_prefill} prefilled (a cacheless server prefills all {total_prompt})"
    )
    print(
        f"cache holds {stats['tokens_stored']} tokens in {stats['nodes']} nodes: "
        f"{stats['device_bytes'] / 2**20:.2f} MB on device (peak {peak_device / 2**20:.2f} MB), "
        f"{stats['host_bytes'] / 2**20:.2f} MB on host; {elapsed:.1f} s in all"
    )
    print(
        f"restored from device {stats['cached_tokens_device']} tokens, from host {stats['cached_tokens_host']}, "
        f"from disk {stats['cached_tokens_disk']}; {stats['page_outs']} page-outs, "
        f"{stats['evictions']} evictions ({stats['evicted_tokens']} tokens)"
    )
    cache.close()  # with a disk tier: everything goes to disk, with its index, for the next run
    if args.replay_on:
        replay_prefill = replay(args.replay_on, args, trace)
        ratio = replay_prefill / total_prefill
        print(
            f"replayed the same {len(trace)} requests on {args.replay_on}: {replay_prefill} tokens prefilled, "
            f"{ratio:.3f}x the {total_prefill} of {args.model}"
        )
    if failed_checks:
        print(f"{failed_checks} turns restored less than the previous prompt + reply - 1", file=sys.stderr)
        return 1
    return 0


def replay(model_name: str, args: argparse.Namespace, trace: list) -> int:
    """Serve recorded requests on another model, forcing the recorded replies; returns tokens prefilled."""
    model, _ = load_model(model_name, seed=args.seed)
    cache = PrefixCache(model.make_cache, namespace=model_name)
    prefilled = 0
    for prompt, reply, hints in tqdm(trace, desc=f"replay on {model_name}", leave=False, file=sys.stderr):
        forced = iter(reply)
        result = generate(
            model,
            cache,
            prompt,
            max_tokens=len(reply),
            sampler=lambda logits, history: next(forced),
            prefill_step_size=args.prefill_step,
            capture_hints=hints,
        )
        prefilled += result.prefill_tokens
    return prefilled


if __name__ == "__main__":
    sys.exit(main())
