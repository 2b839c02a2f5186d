"""Run benchmarks: `python -m bench [NAME ...]`; without names, all of them.

Each benchmark is a module `bench/<name>.py` with a `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not m.name.startswith("_")
    )


def main() -> int:
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or available()
    options = [a for a in sys.argv[1:] if a.startswith("-")]
    unknown = set(names) - set(available())
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; have {', '.join(available())}")
        return 2
    status = 0
    for name in names:
        print(f"\n=== bench {name} ===", flush=True)
        status |= importlib.import_module(f"bench.{name}").main(options)
    return status


if __name__ == "__main__":
    sys.exit(main())
