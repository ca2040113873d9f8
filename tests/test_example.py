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


def test_example_run_twice_on_a_disk_dir_starts_warm(tmp_path, capsys):
    example = load_example()
    args = ["--conversations", "2", "--turns", "2", "--max-tokens", "6", "--disk-dir", str(tmp_path / "disk")]
    assert example.main(args) == 0
    first = capsys.readouterr().out
    assert example.main(args) == 0
    second = capsys.readouterr().out
    rows = lambda out: [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+", line)]  # noqa: E731
    assert all(int(r[7]) == 0 for r in rows(first))  # the disk column: nothing on disk yet
    first_turns = [r for r in rows(second) if r[1] == "0"]
    assert first_turns and all(int(r[7]) > 0 for r in first_turns)  # the second run's first turns come from disk
    assert all(int(r[3]) == int(r[2]) - 1 for r in first_turns)  # the whole prompt but one token
