"""The README's Python snippets run as written, in order, in one namespace."""

import pathlib
import re


def test_readme_snippets_run(capsys):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    out = capsys.readouterr().out
    restored = [int(m) for m in re.findall(r"tokens, (\d+) restored", out)]
    assert restored[0] == 0 and restored[1] >= len(scope["system"])  # the system prompt is reused
    # the mlx-lm snippet: the next turn restored the prompt and the whole reply
    assert scope["trie"].stats()["cached_tokens"] == len(scope["prompt"]) + len(scope["reply"])
    # the disk snippet: the restarted cache restored the whole prompt from disk
    assert scope["after_restart"].cached_tokens == len(scope["document"])
