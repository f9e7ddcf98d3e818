"""Helpers for the tests of the command-line programs."""


def exit_code(main, argv: list[str]) -> int:
    """The exit code of a program's `main(argv)`, run in this process: what it returns, or the code of the
    SystemExit that argparse raises for its own errors (and --help)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code
