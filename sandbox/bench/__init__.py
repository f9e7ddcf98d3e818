"""`sandbox-bench <name> [args]`: the project's benchmarks, one module each in this package."""

import importlib
import pkgutil
import sys


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def set_by_bench(overrides: list[str], settings: dict[str, str]) -> str | None:
    """The first of `overrides` whose key is one of `settings` (a setting the benchmark gives every run itself,
    with where it comes from): an override of it would time another run than the row names. None when none is."""
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key in settings:
            return f"{override} is invalid: the bench sets {key} itself ({settings[key]})"
    return None


def repeated_problem(option: str, values) -> str | None:
    """The first of `values` given twice to `option`: it would be measured twice, as two rows of one label."""
    seen = set()
    for value in values:
        if value in seen:
            return f"{option} {value} is invalid: given twice"
        seen.add(value)
    return None


def compile_only_problem(given: dict[str, object]) -> str | None:
    """`--fla-compile-only` times nothing: the first option of `given` (name: its value) that is set would be
    dropped without a word."""
    for option, value in given.items():
        if value:
            return (f"--fla-compile-only is invalid with {option}: it only compiles fla's kernels (time in a later "
                    "run without it)")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: sandbox-bench {{{','.join(names)}}} [args]  (sandbox-bench NAME --help for its own)\n\n"
              f"{__doc__.splitlines()[0]}")
        return 0
    if not argv or argv[0] not in names:
        given = argv[0] if argv else "(nothing)"
        print(f"sandbox-bench: unknown benchmark {given!r}; choose one of {names}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
