"""The ``diffcache`` command.

Exit codes: 0 success; 2 usage errors (argparse); 1 a diffcache error (one line, ``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .errors import DiffcacheError

DEMO_SUITES = {
    "sd": ["deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=5"],
    "dit": ["fora:interval=2", "fora:interval=3", "uniform:interval=3"],
}


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .eval.bench import run_suites

    torch.set_num_threads(args.threads)
    print(
        "diffcache demo: full pipeline vs cache presets on built-in random-weight diffusers pipelines "
        f"({args.steps} steps, median of {args.repeats} alternated runs, {args.threads} thread(s)).\n"
    )
    for table in run_suites(DEMO_SUITES, args.steps, args.repeats, progress=not args.quiet):
        print(table + "\n")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from .schedule import Schedule

    schedule = Schedule.load(args.schedule)
    data = schedule.to_dict()
    print(repr(schedule))
    if schedule.model:
        print(f"model: {schedule.model['class']} (config {schedule.model['fingerprint']})")
    print(f"units ({len(schedule.units)}): {', '.join(schedule.units)}")
    print(f"components: {', '.join(schedule.components)}")
    print(f"cache usage ratio {schedule.cache_usage_ratio:.1%}; per step (1 recompute, 0 reuse, - absent):")
    width = len(str(schedule.num_steps - 1))
    for k, line in enumerate(data["steps"]):
        print(f"  {k:>{width}}  {line}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffcache",
        description="Training-free acceleration of diffusers pipelines: feature caching across denoising steps.",
        epilog="Example: diffcache demo",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only, no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="full vs cache presets, side by side, on built-in pipelines (offline, about a minute)",
        description="Times the full pipeline against cache presets on built-in SD-style and DiT pipelines, "
        "in one process with alternated runs, and prints speedup, ideal speedup and PSNR vs full.",
        epilog="Example: diffcache demo --steps 20 --repeats 3",
    )
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per method (default 3)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings)")
    demo.set_defaults(handler=_demo)

    summary = commands.add_parser(
        "summary",
        help="describe a schedule JSON file",
        description="Prints a schedule's method, model, units and per-step recompute bits.",
        epilog="Example: diffcache summary schedule.json",
    )
    summary.add_argument("schedule", help="path to a schedule JSON file")
    summary.set_defaults(handler=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required (e.g. `diffcache demo`)")
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # transformers warns at import that torchvision is missing (it falls back to PIL); noise for the CLI.
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (DiffcacheError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"diffcache {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
