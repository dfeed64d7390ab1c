"""``python -m fastopt bench|info|demo``: the benchmark against peers and the ceiling, what
this build is and what it will run on, and the digits demo (training to int8, end to end)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _print_info(as_json: bool) -> None:
    from . import info

    facts = info()
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    cuda = facts.pop("cuda")
    width = max(len(k) for k in facts)
    print("fastopt")
    for key, value in facts.items():
        print(f"  {key:<{width}}  {value}")
    if cuda["usable"]:
        print(
            f"  {'cuda':<{width}}  usable: {', '.join(cuda['devices'])} "
            f"(runtime {cuda['runtime_version']}, driver {cuda['driver_version']})"
        )
    else:
        built = "built" if cuda["built"] else "not built"
        print(f"  {'cuda':<{width}}  {built}, not usable: {cuda['reason']}")


def _unwritable(path: str) -> Optional[str]:
    """Why no file can be written at ``path``, or None: checked before a run of minutes."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a directory"
    if not os.path.isdir(folder):
        return f"there is no directory {folder}"
    if not os.access(folder, os.W_OK):
        return f"{folder} is not writable"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    from .bench.common import OPTIMIZERS as BENCH_OPTIMIZERS

    other_cases = ["adafactor", "quant", "newton", "clip", "prune"]

    parser = argparse.ArgumentParser(prog="python -m fastopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, build options, CPU features, threads, CUDA")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_bench = sub.add_parser("bench", help="fastopt vs its peers and the bandwidth ceiling")
    p_bench.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    p_bench.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p_bench.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"only these cases ({', '.join([*BENCH_OPTIMIZERS, *other_cases])})",
    )
    p_bench.add_argument("--json", metavar="PATH", help="write every figure and the machine")
    p_bench.add_argument("--plot", metavar="PATH", help="PNG bar chart (needs matplotlib)")
    p_bench.add_argument(
        "--progress",
        action="store_true",
        help="progress on stderr for a --quick run too when stderr is not a "
        "terminal (a full run always shows it)",
    )
    p_demo = sub.add_parser(
        "demo", help="optimizers, Newton, schedules, CV, distillation, int8, pruning on digits"
    )
    p_demo.add_argument("--quick", action="store_true", help="shorter runs, under a minute")
    p_demo.add_argument("--plot", metavar="FILE", help="PNG of every stage's panels")
    p_demo.add_argument("--json", metavar="FILE", help="write every result")
    args = parser.parse_args(argv)
    for option in ("json", "plot") if args.command != "info" else ():
        path = getattr(args, option)
        why = path and _unwritable(path)
        if why:
            parser.error(f"--{option} {path}: {why}")
    if args.command == "info":
        _print_info(args.json)
        return 0
    if args.command == "demo":
        from . import demo

        return demo.run(args)
    from . import bench

    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
