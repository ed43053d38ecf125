"""Run every benchmark in bench/ (modules named bench_*.py with a `run() -> dict`) and write JSON.

    python -m bench.run_all --out bench/results [--only NAME ...]

Each benchmark compares fedweights with a baseline side by side in one run; targets are recorded
in the JSON next to the measurements, never asserted in tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import time
from pathlib import Path

import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--only", nargs="*", help="benchmark module names (without bench_)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n.removeprefix("bench_") in args.only]
    for name in names:
        started = time.time()
        result = importlib.import_module(f"bench.{name}").run()
        result.setdefault("wall_s", round(time.time() - started, 2))
        path = args.out / f"{name.removeprefix('bench_')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: wrote {path}")


if __name__ == "__main__":
    main()
