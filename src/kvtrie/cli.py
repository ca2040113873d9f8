"""The `kvtrie` command: `kvtrie serve ...` runs mlx_lm.server on kvtrie (see `kvtrie.serve`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

USAGE = """usage: kvtrie serve [mlx_lm.server flags] [kvtrie flags]

  serve   mlx_lm.server with its prompt cache on kvtrie (`kvtrie serve --help` lists the flags)"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "serve":
        if argv is None:  # the process's own entry point: malloc on transparent huge pages (see kvtrie.heap)
            from .heap import exec_with_huge_pages

            exec_with_huge_pages()
        from .serve import main as serve

        serve(rest)
        return
    print(f"kvtrie: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
