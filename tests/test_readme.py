"""Every command the README shows works: each line of its bash blocks and each command of its command table runs
in a cheap form (a few batches of tiny data, one point of a grid, a temporary output folder) and exits with 0.

A command whose program this file does not know fails the test, so a new kind of README command must be given a
cheap form (or a reason it is only checked) here. Commands that need a GPU or are long are checked for composing
only (`--help`, `make -n`, `bash -n`), each with its reason.
"""

import re
import shlex
import subprocess
from fnmatch import fnmatch
import sys
from importlib.metadata import entry_points
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sandbox.train import CONF_DIR, build

REPO = Path(__file__).resolve().parent.parent
CHEAP_RUN = ["debug=fast", "task.limit_examples=64", "model.n_layers=1", "trainer.max_steps=2",
             "callbacks.progress=none"]
# Set-up commands, not run by a test: they make or change an environment, or need a PostgreSQL server.
NOT_RUN = ("python3 -m venv", ". .venv/bin/activate", "pip install", "createdb")
# Benchmarks checked with `--help` only: kernels and mom need a CUDA GPU; train and quickstart take minutes (and
# tests/test_bench.py runs them on tiny sizes); packing times sweeps in child processes (sandbox-sweep runs here).
BENCH_HELP_ONLY = ("kernels", "mom", "train", "quickstart", "packing")


def readme_commands(text: str) -> list[str]:
    """The commands of the bash blocks (a line each, split at `&&`, comments dropped) and of the first column
    of the table under "## Commands" (`a x` / `y` is `a x` and `a y`; `[...]` marks an optional argument), in
    the order they appear."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    for row in re.findall(r"^\| *(`.*?) *\|", table, re.M):
        previous_end, program = 0, None
        for span in re.finditer(r"`([^`]+)`", row):
            command = re.sub(r"\s*\[[^\]]*\]", "", span.group(1))
            if program and row[previous_end:span.start()].strip() == "/":
                command = f"{program} {command}"
            commands.append(command)
            program, previous_end = command.split()[0], span.end()
    return commands


def sweeps(overrides: list[str]) -> dict[str, list[str]]:
    """A multirun's swept keys and their values: its experiment's `hydra.sweeper.params`, then the keys given
    several values (`key=a,b`) on the command line."""
    swept = {}
    for override in overrides:
        if override.startswith("experiment="):
            config = OmegaConf.load(CONF_DIR / "experiment" / f"{override.split('=', 1)[1]}.yaml")
            params = OmegaConf.select(config, "hydra.sweeper.params", default={})
            swept.update({key: sweep_values(key, str(values)) for key, values in params.items()})
    for override in overrides:
        key, _, values = override.partition("=")
        if "," in values:
            swept[key] = values.split(",")
    return swept


def sweep_values(key: str, values: str) -> list[str]:
    """A swept key's values: `a,b,...`, or Hydra's `glob([pattern, ...])` over the key's config group."""
    match = re.fullmatch(r"glob\(\[(.*)\]\)", values)
    if match is None:
        return values.split(",")
    patterns = [p.strip() for p in match.group(1).split(",")]
    names = sorted(path.stem for path in (CONF_DIR / key).glob("*.yaml"))
    return [name for name in names if any(fnmatch(name, pattern) for pattern in patterns)]


def one_job(overrides: list[str], **chosen: str) -> list[str]:
    """A multirun's overrides cut to one job: every swept key at its first value, or at the one chosen."""
    swept = sweeps(overrides)
    fixed = [o for o in overrides if o.partition("=")[0] not in swept]
    return fixed + [f"{key}={chosen.get(key, values[0])}" for key, values in swept.items()]


def with_options(args: list[str], **options: str) -> list[str]:
    """`args` with each `--option value` replaced, or put first when absent."""
    args = list(args)
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args = [flag, value, *args]
    return args


def cheap_form(argv: list[str], out: Path, variables: dict) -> list[list[str]]:
    """The command lines that check `argv` cheaply; none for a set-up command (NOT_RUN)."""
    program, args = argv[0], argv[1:]
    args = [str(out) + a.removeprefix("outputs") if a.startswith("outputs/") else a for a in args]
    if "=" in program and not args:  # a shell variable, which later commands name
        name, value = program.split("=", 1)
        variables[name] = value
        return []
    if shlex.join(argv).startswith(NOT_RUN):
        return []
    if program == "make":  # `make -n` checks the target; its recipe's sandbox commands run in their cheap form
        recipe = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True)
        lines = [["make", "-n", *args]]
        for line in recipe.stdout.splitlines():
            words = shlex.split(line)
            if words and Path(words[0]).name.startswith("sandbox-"):
                lines += cheap_form([Path(words[0]).name, *words[1:]], out, variables)
        return lines
    if program == ".ci/gpu":  # needs a CUDA machine: its syntax only
        return [["bash", "-n", program]]
    if program == "sandbox-train":
        return [[program, *(one_job(args) if "-m" in args else args), *CHEAP_RUN, f"output_root={out}"]]
    if program == "sandbox-sweep":
        # One trial, in this process (tests/test_sweep.py runs several workers); a PostgreSQL server is not at
        # hand, so its URL becomes a sqlite file, which Optuna opens by URL the same way.
        # The machines of that study write their trial folders apart from the one-machine sweep's folder of the same
        # study name, which the new study's trials would otherwise find (and be refused).
        shared = "postgresql" in " ".join(args)
        storage = {"storage": f"sqlite:///{out / 'study.db'}"} if shared else {}
        root = out / "machines" if shared else out
        options = with_options(args, n_trials="1", workers="1", output_root=str(root), **storage)
        return [[program, *options, *CHEAP_RUN]]
    if program == "sandbox-bench" and args[0] in BENCH_HELP_ONLY:
        return [[program, args[0], "--help"]]
    if program == "sandbox-bench" and args[0] == "tasks":
        return [[program, "tasks", *with_options(args[1:], num_examples="1000")]]
    if program in ("sandbox-report", "sandbox-tasks", "sandbox-routing"):
        return [[program, *args]]
    raise AssertionError(f"README command {shlex.join(argv)!r}: tests/test_readme.py has no cheap form for it")


def test_readme_commands_are_found():
    text = ("```bash\nmake x   # a comment\nsandbox-train a=1 && sandbox-report outputs/q\n```\n## Commands\n"
            "| command | what |\n|---|---|\n| `sandbox-tasks list`, `sandbox-tasks summary mqar` | one |\n"
            "| `sandbox-bench tasks` / `mom` | two |\n| `.ci/gpu [folder]` | three |\n## Next\n| `no` | x |\n")
    assert readme_commands(text) == ["make x", "sandbox-train a=1", "sandbox-report outputs/q", "sandbox-tasks list",
                                     "sandbox-tasks summary mqar", "sandbox-bench tasks", "sandbox-bench mom",
                                     ".ci/gpu"]


def run(line: list[str], monkeypatch) -> int:
    """Exit code of a command line: the sandbox programs run in this process, through the functions their
    console scripts call (no start-up of torch per command), the others as child processes."""
    scripts = entry_points(group="console_scripts", name=line[0])
    if not scripts:
        return subprocess.run(line, cwd=REPO).returncode
    monkeypatch.setattr(sys, "argv", line)
    try:
        return next(iter(scripts)).load()() or 0
    except SystemExit as exit:  # argparse's --help and errors
        return exit.code or 0


def test_every_readme_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # sandbox-train sets it: restored after the test
    commands = readme_commands((REPO / "README.md").read_text())
    assert {"make quickstart", "make test"} <= set(commands)
    variables, done, failed = {}, set(), []
    for command in commands:
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), command))
        for line in cheap_form(argv, tmp_path / "outputs", variables):
            if tuple(line) not in done:
                done.add(tuple(line))
                code = run(line, monkeypatch)
                failed += [f"{command!r} as {shlex.join(line)!r}: exit code {code}"] if code else []
    assert not failed, "\n".join(failed)


def test_every_value_of_the_readme_grids_builds():
    """The README's multiruns run one job each above: every value of each swept key must compose and build its
    data and model too."""
    grids = [[a for a in shlex.split(c)[1:] if a != "-m"] for c in readme_commands((REPO / "README.md").read_text())
             if c.startswith("sandbox-train -m")]
    assert grids
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in grids:
            for key, values in sweeps(overrides).items():
                for value in values:
                    build(compose("train", [*one_job(overrides, **{key: value}), *CHEAP_RUN]))
