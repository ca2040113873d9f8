"""The multi-conversation example: every turn restores the previous turn, hybrid ≈ transformer."""

import importlib.util
import pathlib
import re

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "multi_conversation.py"


def load_example():
    spec = importlib.util.spec_from_file_location("multi_conversation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_turns_hit_and_hybrid_prefills_within_5_percent(capsys):
    example = load_example()
    code = example.main(["--conversations", "3", "--turns", "3", "--max-tokens", "12", "--replay-on", "tiny-qwen3-next"])
    out = capsys.readouterr().out
    assert code == 0, out  # non-zero when a turn restored less than the previous prompt + reply - 1
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+", line)]
    assert len(rows) == 9 and all(r[-1] == "ok" for r in rows)
    assert all(int(r[3]) > 0 for r in rows[1:])  # everything after the first request hits the system prompt
    ratio = float(re.search(r"prefilled, ([\d.]+)x the", out).group(1))
    assert ratio <= 1.05
