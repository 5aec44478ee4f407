"""The ``lavender`` command line.

Each subcommand is a small module in :mod:`lavender.commands` with ``add_arguments(parser)`` and
``main(args) -> int``; this file only dispatches, so importing it is cheap and ``--help`` is fast.
Every subcommand accepts ``--config FILE.yaml``: its keys are the flags' names (dashes or
underscores), flags given on the command line override it, and unknown keys are an error.
"""

from __future__ import annotations

import argparse
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


class ConfigError(ValueError):
    """A ``--config`` file that does not fit the command."""


def apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Load a YAML file as defaults of ``parser``; unknown keys raise naming the key and the file."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option names to values")
    known = {a.dest for a in parser._actions}
    defaults = {}
    for key, value in cfg.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise ConfigError(f"{path}: unknown option {key!r} for this command (see --help)")
        defaults[dest] = value
    # a config satisfies required options, as flags would
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False
    parser.set_defaults(**defaults)


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"lavender {name}", description=module.__doc__ or help_text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    module.add_arguments(parser)
    for action in parser._actions:  # sub-subcommands (``lavender data mix``) take --config too
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--config" not in sub._option_string_actions:
                    sub.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    return parser, module


def _chosen_subparser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser a config applies to: the sub-subcommand's (``lavender data mix``) if there is one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for token in argv:
                if token in action.choices:
                    return action.choices[token]
    return parser


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` for subcommand ``name`` (honouring ``--config``) and run it in-process."""
    parser, module = build_parser(name)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            apply_config(_chosen_subparser(parser, argv), known.config)
        except (ConfigError, OSError) as e:
            parser.error(str(e))
    args = parser.parse_args(argv)
    return int(module.main(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
        print("usage: lavender COMMAND [--config FILE.yaml] [options]\n\ncommands:\n" + "\n".join(lines))
        return 0
    if argv[0] in ("-V", "--version"):
        from lavender import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"lavender: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(name, argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
