"""The ``lavender`` command line.

Each subcommand is a small module in :mod:`lavender.commands` declaring ``CONFIGS`` (its
dataclasses, from :mod:`lavender.config`) and ``main(*configs) -> int``; a command with
sub-subcommands (``lavender data convert``) declares ``SUBCOMMANDS = {name: (help, CONFIGS, main)}``.
This file only dispatches: modules are imported when their command runs, so ``--help`` is fast.

Every command accepts ``--config FILE.yaml`` (keys: the flags' names, either spelling, or an
alias; flags override it; unknown keys and bad values fail before anything loads) and ``--debug``.
Expected failures print one line ``lavender <command>: error: <what and how to fix it>`` and exit
2 (usage) or 1 (runtime); a traceback only with ``--debug`` or ``LAVENDER_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("lavender.commands.extract", "Stage 1: per-word diffusion attention maps"),
    "inspect": ("lavender.commands.inspect", "counts and checks of an attention dataset"),
    "tiny-dm": ("lavender.commands.tiny_dm", "write a tiny random Stable Diffusion pipeline"),
    "tiny-vlm": ("lavender.commands.tiny_vlm", "write a tiny random VLM and its processor"),
    "attend": ("lavender.commands.attend", "a VLM's per-word attention maps for one image"),
    "train": ("lavender.commands.train", "Stage 2: diffusion instruction tuning"),
    "export": ("lavender.commands.export", "merge a LoRA run into a plain model folder"),
    "generate": ("lavender.commands.generate", "generate answers with a model or run"),
    "eval": ("lavender.commands.eval", "score a model on records"),
    "analyze": ("lavender.commands.analyze", "entropy and alignment of DM vs VLM maps"),
    "data": ("lavender.commands.data", "convert, mix and split record files"),
    "demo": ("lavender.commands.demo", "the miniature world, end to end"),
    "world": ("lavender.commands.world", "recipes of the miniature world's models"),
}

#: exceptions reported as one line (anything else is a bug and keeps its traceback)
EXPECTED = (ValueError, OSError, ImportError, RuntimeError)


def _group_usage(prog: str, module: object) -> str:
    subs = module.SUBCOMMANDS
    width = max(map(len, subs))
    lines = [f"  {n:<{width}}  {h}" for n, (h, _, _) in subs.items()]
    return f"usage: {prog} {{{','.join(subs)}}} [options]\n\n{module.__doc__ or ''}\nrecipes:\n" + "\n".join(lines)


def resolve(name: str, argv: Sequence[str]) -> tuple[str, tuple[type, ...], object, object, str | None, list[str]]:
    """``(prog, configs, main, defaults_hook, description, remaining argv)`` of a command line."""
    from lavender.config import UsageError

    module = importlib.import_module(COMMANDS[name][0])
    prog = f"lavender {name}"
    argv = list(argv)
    subs = getattr(module, "SUBCOMMANDS", None)
    if subs is None:
        return prog, module.CONFIGS, module.main, getattr(module, "defaults", None), module.__doc__, argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_group_usage(prog, module))
        raise SystemExit(0)
    if argv[0] not in subs:
        raise UsageError(f"unknown recipe {argv[0]!r}; choose one of {', '.join(subs)}")
    help_text, configs, run = subs[argv[0]]
    return f"{prog} {argv[0]}", configs, run, None, help_text, argv[1:]


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` for subcommand ``name`` (honouring ``--config``) and run it in-process."""
    from lavender.config import LavenderError, LavenderParser, UsageError, debug_requested, report_error

    debug = debug_requested(argv) and name != "train" or debug_requested([])
    prog = f"lavender {name}"
    try:
        prog, configs, run, defaults, description, rest = resolve(name, argv)
        parser = LavenderParser(configs, prog=prog, description=description)
        cfgs = parser.parse(rest, defaults=defaults)
    except UsageError as e:
        return report_error(prog, e, debug)
    except SystemExit as e:  # argparse's own usage errors (already printed) and --help
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        return int(run(*cfgs) or 0)
    except (LavenderError, *EXPECTED) as e:
        return report_error(prog, e, debug)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the console script: Ctrl-C ends with a line, not a traceback
        try:
            return _main(sys.argv[1:])
        except KeyboardInterrupt:
            print("lavender: interrupted", file=sys.stderr)
            return 130
    return _main(argv)


def _main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "--debug":  # ``lavender --debug train ...``: tracebacks for any command
        import os

        os.environ["LAVENDER_DEBUG"] = "1"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
        print("usage: lavender COMMAND [--config FILE.yaml] [--debug] [options]\n\ncommands:\n" + "\n".join(lines))
        return 0
    if argv[0] in ("-V", "--version"):
        from lavender import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"lavender: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(name, argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
