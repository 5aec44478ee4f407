"""Thin CLI subcommands: ``add_arguments(parser)`` + ``main(args)`` each."""
