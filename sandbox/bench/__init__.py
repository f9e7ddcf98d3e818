"""`sandbox-bench <name> [args]`: the project's benchmarks, one module each in this package."""

import importlib
import pkgutil
import sys


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


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
