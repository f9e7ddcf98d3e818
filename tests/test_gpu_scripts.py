"""The shell scripts that run the committed GPU measurements (docs/results/) parse; `run_limit`, which decides
how long a packed run may train and whether it starts at all, gives the limits it documents; and packed runs that
ran out of GPU memory run again. Device time is scarce: a script that fails there costs a command.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GPU_ENV = REPO / "docs" / "results" / "fidelity" / "gpu_env.sh"
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs" / "results").rglob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    done = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def run_limit(elapsed_s: int, **env: str) -> tuple[int, str, str]:
    """run_limit of gpu_env.sh (its definition alone: sourcing the file installs packages) `elapsed_s` after
    start_runs, with the given variables: exit status, stdout, stderr."""
    function = "\n".join(re.search(rf"^{name}\(\) \{{.*?^\}}", GPU_ENV.read_text(), re.S | re.M).group(0)
                         for name in ("whole_number", "run_limit"))
    assignments = " ".join(f"{name}={value}" for name, value in env.items())
    script = f"{function}\nruns_start=$(( {int(time.time())} - {elapsed_s} ))\n{assignments}\nrun_limit"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    return done.returncode, done.stdout.strip(), done.stderr.strip()


@pytest.mark.parametrize(("elapsed", "env", "limit"), [
    (0, {}, "540"),                                    # RUN_LIMIT_S's default
    (0, {"RUN_LIMIT_S": "30"}, "30"),                  # a short limit given is kept
    (100, {"STOP_AFTER_S": "500"}, "400"),             # STOP_AFTER_S comes first
    (0, {"STOP_AFTER_S": "900", "RUN_LIMIT_S": "300"}, "300"),
])
def test_run_limit_gives_the_seconds_a_run_may_take(elapsed, env, limit):
    status, out, _ = run_limit(elapsed, **env)
    assert (status, out) == (0, limit)


@pytest.mark.parametrize(("elapsed", "env", "named"), [
    (450, {"STOP_AFTER_S": "500"}, "under a minute left"),
    (0, {"RUN_LIMIT_S": "9m"}, "RUN_LIMIT_S=9m is invalid"),
    (0, {"STOP_AFTER_S": "8m"}, "STOP_AFTER_S=8m is invalid"),
    (0, {"RUN_LIMIT_S": "0"}, "RUN_LIMIT_S=0 is invalid: a whole number >= 1"),  # timeout 0: no limit at all
])
def test_run_limit_starts_no_run_and_says_why(elapsed, env, named):
    status, out, err = run_limit(elapsed, **env)
    assert status != 0 and out == "" and named in err


def run_script(tmp_path, argv: list[str], python: str = "", **env: str) -> subprocess.CompletedProcess:
    """A script of docs/results/ (zoology/run.sh, zoology/protocol.sh, mad/run.sh) run in `tmp_path` with
    gpu_env.sh's functions (not its package install), the repo's conf/, an `nvidia-smi` that gives an 80 GB card,
    and a `python` that appends its arguments to `tmp_path`/calls, then runs `python` (bash), then prints a run's
    last line."""
    command, kwargs = script_command(tmp_path, argv, python, **env)
    return subprocess.run(command, **kwargs, capture_output=True, text=True, timeout=60)


def script_command(tmp_path, argv: list[str], python: str = "", **env: str) -> tuple[list[str], dict]:
    """run_script's command and its arguments to subprocess: the files it needs written in `tmp_path`."""
    functions = GPU_ENV.read_text().split("\nexport PYTHONPATH=", 1)[1].split("\n", 1)[1]
    for script, text in [("docs/results/fidelity/gpu_env.sh", functions),
                         *((s, (REPO / s).read_text()) for s in ("docs/results/zoology/run.sh",
                                                                  "docs/results/zoology/protocol.sh",
                                                                  "docs/results/mad/run.sh")),
                         ("bin/nvidia-smi", "#!/usr/bin/env bash\necho 81559\n"),
                         ("bin/python", f'#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n{python}\n'
                                        'echo "sandbox-train: run: best val acc 0.99, test acc 0.99"\n')]:
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / script).write_text(text)
    for program in ("python", "nvidia-smi"):
        (tmp_path / "bin" / program).chmod(0o755)
    if not (tmp_path / "conf").exists():  # a second command in the same place
        (tmp_path / "conf").symlink_to(REPO / "conf")
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "ROOT": str(tmp_path / "runs"),
           "CALLS": str(tmp_path / "calls"), **env}
    (tmp_path / "out").mkdir(exist_ok=True)
    return ["bash", *argv], {"cwd": tmp_path, "env": env}


@pytest.fixture
def fake_mps_control(tmp_path):
    """An nvidia-cuda-mps-control on the scripts' PATH that logs each call (`-d` starts the daemon, `quit` on
    its input stops it); yields the log. Its daemon stays in the background, holding the files it was given
    open, as a real one may."""
    log, daemon = tmp_path / "mps-calls", tmp_path / "mps-daemon.pid"
    control = tmp_path / "bin" / "nvidia-cuda-mps-control"
    control.parent.mkdir(parents=True, exist_ok=True)
    control.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -d ]; then echo start >> {log}\n'
                       f'  sleep 120 > /dev/null 2>&1 & echo $! > {daemon}\nelse cat >> {log}; fi\n')
    control.chmod(0o755)
    yield log
    if daemon.exists():
        subprocess.run(["kill", daemon.read_text().strip()], check=False)


def test_scripts_side_by_side_share_one_mps_daemon(tmp_path, fake_mps_control):
    """Two zoology/run.sh at once (one ROOT each, as packed parts run): one daemon, started by the first and
    stopped once, by the last to finish. Each started and stopped its own, so the first to finish took the
    daemon from under the other's runs."""
    log = fake_mps_control
    both_started = 'echo x >> "$CALLS.started"; while [ "$(wc -l < "$CALLS.started")" -lt 2 ]; do sleep 0.05; done'
    procs = []
    for width in ("64", "128"):
        command, kwargs = script_command(tmp_path, ["docs/results/zoology/run.sh", width, "0", "attention:1e-3"],
                                         both_started, ROOT=str(tmp_path / f"runs{width}"),
                                         MPS_USERS=str(tmp_path / "mps-users"))
        procs.append(subprocess.Popen(command, **kwargs, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    # start_mps first stops a daemon that a killed command may have left
    assert log.read_text().split() == ["quit", "start", "quit"]


@pytest.mark.parametrize("mps, machine_has_it, calls, said", [
    (None, False, [], "no CUDA MPS on this machine: the packed runs are time-sliced"),
    ("0", True, [], ""),
    ("1", True, ["quit", "start", "quit"], ""),
])
def test_mps_by_default_where_the_machine_has_it(mps, machine_has_it, calls, said, tmp_path, request):
    log = request.getfixturevalue("fake_mps_control") if machine_has_it else tmp_path / "mps-calls"
    env = {"MPS_USERS": str(tmp_path / "mps-users"), **({"MPS": mps} if mps else {})}
    done = run_script(tmp_path, ["docs/results/zoology/run.sh", "64", "0", "attention:1e-3"], **env)
    assert done.returncode == 0, done.stderr
    assert (log.read_text().split() if log.exists() else []) == calls
    assert (said in done.stdout) if said else "MPS" not in done.stdout


def test_runs_that_ran_out_of_gpu_memory_run_once_more_at_the_end(tmp_path):
    """docs/results/zoology/run.sh with a `python` that fails seed 1's first run the way CUDA does when packed
    runs fill the card."""
    calls = tmp_path / "calls"
    done = run_script(tmp_path, ["docs/results/zoology/run.sh", "64", "0,1,2", "attention:1.0e-3"],
                      'if [[ "$*" == *seed=1* && ! -e "$CALLS.oom" ]]; then touch "$CALLS.oom"\n'
                      '  echo "torch.OutOfMemoryError: CUDA out of memory"; exit 1; fi', MAX_PROCS="2")
    assert done.returncode == 0, done.stderr
    seeds = sorted(re.search(r"seed=(\d)", line).group(1) for line in calls.read_text().splitlines())
    assert seeds == ["0", "1", "1", "2"]
    assert "out of GPU memory, run again: attention:1.0e-3:1" in done.stdout


def test_a_command_given_again_keeps_the_earlier_output_and_reruns_nothing_for_memory(tmp_path):
    """The same command given twice (as a resume is): each run's log keeps both commands' output, and a run that
    ran out of memory in the first command, then trained, is not taken for one out of memory in the second."""
    argv = ["docs/results/zoology/run.sh", "64", "1", "attention:1.0e-3"]
    python = ('if [[ ! -e "$CALLS.oom" ]]; then touch "$CALLS.oom"\n'
              '  echo "torch.OutOfMemoryError: CUDA out of memory"; exit 1; fi')
    first = run_script(tmp_path, argv, python)
    assert "out of GPU memory, run again" in first.stdout
    second = run_script(tmp_path, argv, python)
    assert second.returncode == 0 and "out of GPU memory" not in second.stdout, second.stdout
    log = (tmp_path / "runs" / "logs" / "attention-1.0e-3-d64-s1.log").read_text()
    assert log.count("\n== ") + log.startswith("== ") == 3 and log.count("OutOfMemoryError") == 1, log


MODELS = "attention deltanet gated_deltanet gated_deltanet_equal_state gla linear_attention mom mom_m2 " \
         "mom_m2_noshared mom_m8 mom_m8_noshared mom_noshared simple_gla"


@pytest.mark.parametrize("argv, env, message", [
    (["zoology/run.sh"], {}, "zoology/run.sh: error: WIDTH '' is invalid: a whole number >= 1 (model.d_model)"),
    (["zoology/run.sh", "wide", "0", "mom:1e-3"], {}, "zoology/run.sh: error: WIDTH 'wide' is invalid"),
    (["zoology/run.sh", "64", "", "mom:1e-3"], {},
     "zoology/run.sh: error: SEEDS '' is invalid: whole numbers separated by commas (0,1,2)"),
    (["zoology/run.sh", "64", "0"], {}, "zoology/run.sh: error: no runs given"),
    (["zoology/run.sh", "64", "0", "mom:1e-3", "atention:1e-3"], {},
     f"zoology/run.sh: error: model 'atention' is invalid: choose one of {MODELS}"),
    (["zoology/run.sh", "64", "0", "mom:fast"], {},
     "zoology/run.sh: error: run 'mom:fast' is invalid: MODEL:LR, LR a number > 0 (attention:2.2e-3)"),
    (["zoology/run.sh", "64", "0", "mom"], {}, "zoology/run.sh: error: run 'mom' is invalid"),  # ran at lr 0
    (["zoology/run.sh", "64", "0", "stacked", "mom", "mamba"], {}, "zoology/run.sh: error: model 'mamba' is invalid"),
    (["mad/run.sh"], {}, "mad/run.sh: error: no task given: run.sh TASK,... MODEL,... [OVERRIDE ...]"),
    (["mad/run.sh", "mad_recall,mad_recal", "mom"], {}, "mad/run.sh: error: task 'mad_recal' is invalid: choose one"),
    (["mad/run.sh", "mad_recall", ","], {}, "mad/run.sh: error: no model given"),
    (["mad/run.sh", "mad_recall", "mom,mamba"], {},
     f"mad/run.sh: error: model 'mamba' is invalid: choose one of {MODELS}"),
    # MAX_PROCS=0 waited forever, MAX_PROCS=abc started every run at once
    (["zoology/run.sh", "64", "0", "mom:1e-3"], {"MAX_PROCS": "0"}, "MAX_PROCS=0 is invalid: a whole number >= 1"),
    (["zoology/run.sh", "64", "0", "mom:1e-3"], {"MAX_PROCS": "abc"}, "MAX_PROCS=abc is invalid: a whole number >= 1"),
    (["mad/run.sh", "mad_recall", "mom"], {"PROCESSES": "abc"},
     "mad/run.sh: error: PROCESSES=abc is invalid: a whole number >= 1"),
    (["zoology/run.sh", "64", "0", "mom:1e-3"], {"RUN_LIMIT_S": "9m"}, "RUN_LIMIT_S=9m is invalid"),
    (["mad/run.sh", "mad_recall", "mom"], {"MPS": "yes"}, "MPS=yes is invalid: 0, 1 or auto (the default)"),
    (["zoology/protocol.sh"], {}, "protocol.sh: error: WIDTH '' is invalid: a whole number >= 1 (model.d_model)"),
    (["zoology/protocol.sh", "64"], {"PROCESSES": "0"}, "protocol.sh: error: PROCESSES=0 is invalid: a whole number"),
    (["zoology/protocol.sh", "64"], {"STOP_AFTER_S": "9m"}, "STOP_AFTER_S=9m is invalid"),
    # output_root=/tmp/a,b swept output_root: every run trained in /tmp/a and in ./b, the tarball had neither
    (["zoology/protocol.sh", "64"], {"ROOT": "/tmp/a,b"}, "ROOT=/tmp/a,b is invalid: a path of letters"),
    (["zoology/run.sh", "64", "0", "mom:1e-3"], {"ROOT": "/tmp/my runs"}, "ROOT=/tmp/my runs is invalid"),
    (["mad/run.sh", "mad_recall", "mom"], {"ROOT": "/tmp/a,b"}, "ROOT=/tmp/a,b is invalid"),
], ids=["zoology-nothing", "width-a-word", "seeds-empty", "no-runs", "model-typo", "rate-a-word", "rate-missing",
        "stacked-model-typo", "mad-nothing", "task-typo", "no-model", "mad-model-typo",
        "max-procs-0", "max-procs-a-word", "mad-processes-a-word", "run-limit-a-word", "mps-a-word", "protocol-nothing",
        "protocol-processes-0", "protocol-stop-a-word", "protocol-root-a-comma", "root-a-space", "mad-root-a-comma"])
def test_bad_script_arguments_are_one_line_exit_2_before_any_run(argv, env, message, tmp_path):
    """Each was passed on to every run's sandbox-train, which failed it in its log after the runs before it had
    started; or nothing ran and an empty tarball was written, exit code 0."""
    done = run_script(tmp_path, [f"docs/results/{argv[0]}", *argv[1:]], **env)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr
    assert not (tmp_path / "calls").exists() and not (tmp_path / "runs").exists()
    assert list((tmp_path / "out").iterdir()) == []


CHOOSE = 'if [[ $1 == */chosen_rates.py ]]; then echo "mom:0.01 attention:0.0022"; exit; fi\n'


@pytest.mark.parametrize("width, processes", [("64", 14), ("128", 11), ("256", 7)])
def test_protocol_runs_seed_0_then_seeds_1_and_2_at_the_chosen_rates(width, processes, tmp_path):
    """protocol.sh: one `sandbox-train -m` for seed 0 at every model and rate, then run.sh at the rates that
    chosen_rates.py reads from the runs, seeds 1 and 2, packed as many at once as an 80 GB card holds at the width
    (an H100 held about eight width-256 runs)."""
    done = run_script(tmp_path, ["docs/results/zoology/protocol.sh", width], CHOOSE, MPS="0")
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("-m sandbox.train -m experiment=zoology ") and f"model.d_model={width} seed=0 " \
        f"hydra.launcher.processes={processes}" in calls[0]
    assert calls[1] == f"docs/results/zoology/chosen_rates.py {tmp_path / 'runs'}/zoology"
    seeds = sorted(re.search(r"model=(\S+) optim.lr=(\S+) seed=(\d)", call).groups() for call in calls[2:])
    assert seeds == [("attention", "0.0022", "1"), ("attention", "0.0022", "2"), ("mom", "0.01", "1"),
                     ("mom", "0.01", "2")]
    assert (tmp_path / "out" / f"zoology_d{width}_protocol.tar.gz").exists()


def test_protocol_chooses_nothing_while_seed_0_is_unfinished(tmp_path):
    """A seed-0 pass stopped by STOP_AFTER_S (its launcher exits 143, the runs checkpointed) starts no seeds:
    a choice among the rates that finished could change when the others do. The same command resumes."""
    done = run_script(tmp_path, ["docs/results/zoology/protocol.sh", "64"], CHOOSE + "exit 143", MPS="0")
    assert done.returncode == 0, done.stderr
    assert "seed 0 pass: exit code 143" in done.stdout
    assert [call.split()[:2] for call in (tmp_path / "calls").read_text().splitlines()] == [["-m", "sandbox.train"]]
    assert (tmp_path / "out" / "zoology_d64_protocol.tar.gz").exists()


@pytest.mark.parametrize("env, processes", [({}, 12), ({"PROCESSES": "5"}, 5)])
def test_mad_parts_are_one_multirun_packed_by_the_launcher(env, processes, tmp_path):
    """mad/run.sh: the tasks x models given, with the further overrides, as one `sandbox-train -m` whose jobs
    the sandbox launcher packs as processes (not one shell process per run); its exit code is said."""
    done = run_script(tmp_path, ["docs/results/mad/run.sh", "mad_recall,mad_recall_v128", "attention,mom",
                                 "optim.lr=5.0e-4,1.0e-3", "seed=0"], "exit 143", MPS="0", **env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "-m sandbox.train -m experiment=mad task=mad_recall,mad_recall_v128 model=attention,mom "
        f"optim.lr=5.0e-4,1.0e-3 seed=0 output_root={tmp_path / 'runs'} callbacks.progress=lines "
        f"hydra.launcher.processes={processes}"]
    assert "multirun: exit code 143" in done.stdout
    assert (tmp_path / "out" / "mad.tar.gz").exists()


@pytest.mark.parametrize("seed0_exit, seeds_run, exit_code", [
    ("3", True, 0),    # every run ended, some diverged: the choice ranks their rates lower and goes on
    ("1", False, 1),   # a run failed: the same command trains it again, nothing chosen
    ("2", False, 1),   # a bad setting
    ("124", False, 0),  # STOP_AFTER_S: resumed by the same command
])
def test_protocol_goes_on_where_seed_0_ended_and_fails_where_it_failed(seed0_exit, seeds_run, exit_code, tmp_path):
    """A seed-0 pass that ended with a diverged run (sandbox-train exit code 3) was taken for an unfinished one: the
    seeds never ran, at every resume; and a seed-0 pass that failed (exit code 1 or 2) left the script at exit
    code 0."""
    done = run_script(tmp_path, ["docs/results/zoology/protocol.sh", "64"],
                      CHOOSE + f'if [[ "$*" == *" seed=0 "* ]]; then exit {seed0_exit}; fi', MPS="0")
    assert done.returncode == exit_code, done.stdout + done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert any("seed=1" in call for call in calls) == seeds_run, calls
    assert (tmp_path / "out" / "zoology_d64_protocol.tar.gz").exists()


def test_runs_that_failed_fail_the_script_and_are_named(tmp_path):
    """zoology/run.sh exited 0 whatever its runs did (the background runs' exit codes were never looked at); a run
    stopped by its limit (124) or diverged (3) is no failure. protocol.sh passes the failure on."""
    python = ('if [[ "$*" == *seed=1* ]]; then exit 1; fi\n'
              'if [[ "$*" == *seed=2* ]]; then exit 124; fi\n'
              'if [[ "$*" == *seed=3* ]]; then exit 3; fi')
    done = run_script(tmp_path, ["docs/results/zoology/run.sh", "64", "0,1,2,3", "attention:1.0e-3"], python)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed (the same command runs them again): attention-1.0e-3-d64-s1.log" in done.stdout
    assert (tmp_path / "out" / "zoology_d64_s0_1_2_3.tar.gz").exists()
    protocol = run_script(tmp_path, ["docs/results/zoology/protocol.sh", "64"],
                          CHOOSE + 'if [[ "$*" == *seed=1* ]]; then exit 1; fi', MPS="0")
    assert protocol.returncode == 1 and "failed (the same command runs them again)" in protocol.stdout


def test_a_run_that_ended_without_a_record_is_named(tmp_path):
    """A run killed outright (its log stopped without the interruption's line) left metrics.csv and no result.json:
    nothing the script printed named it, and the report leaves it out."""
    python = ('run="$ROOT/zoology/model=attention,seed=$(sed "s/.*seed=\\([0-9]\\).*/\\1/" <<< "$*")"\n'
              'mkdir -p "$run/logs" && touch "$run/logs/metrics.csv"\n'
              'if [[ "$*" != *seed=1* ]]; then echo {} > "$run/result.json"; fi')
    done = run_script(tmp_path, ["docs/results/zoology/run.sh", "64", "0,1", "attention:1.0e-3"], python)
    assert done.returncode == 0, done.stdout + done.stderr
    named = [line for line in done.stdout.splitlines() if "without a record" in line]
    assert named == ["ended without a record (no result.json): zoology/model=attention,seed=1"]


REPORTED_RUNS = REPO / "docs" / "results" / "zoology_6000_steps" / "d256" / "runs"


def chosen_rates(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "docs/results/zoology/chosen_rates.py", str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("statuses, chosen", [
    ({"0.01": "diverged"}, "report"),                          # the report ranks the diverged rate below the others
    ({"0.01": "interrupted"}, None),                           # it could still win when it finishes
    ({lr: "diverged" for lr in ("0.0001", "0.00046", "0.0022", "0.01")}, None),  # nothing to choose
])
def test_chosen_rates_chooses_as_the_report_does(statuses, chosen, tmp_path):
    """chosen_rates.py on attention's four seed-0 runs of width 256, some of them set to other statuses: where a rate
    diverged on seed 0 it printed no choice (every resume of protocol.sh again), where the report chose one."""
    from sandbox.report import make_rows, to_runs
    from sandbox.results import collect_results

    for run in REPORTED_RUNS.glob("model.d_model=256,model=attention,*"):
        shutil.copytree(run, tmp_path / run.name)
        lr = re.search(r"optim\.lr=([^,]+)", run.name).group(1)
        if lr in statuses:
            result = json.loads((tmp_path / run.name / "result.json").read_text())
            result["status"] = statuses[lr]
            for key in ("best_val_acc", "test_acc", "test_loss"):
                result[key] = float("nan")
            (tmp_path / run.name / "result.json").write_text(json.dumps(result))
    done = chosen_rates(tmp_path)
    assert done.returncode == 0, done.stderr
    if chosen is None:
        assert done.stdout.strip() == "" and "attention (d_model 256): " in done.stderr
    else:
        [row] = make_rows(to_runs(collect_results(tmp_path)))
        assert row.choice is not None and done.stdout.split() == [f"attention:{row.choice[0]}"]


@pytest.mark.parametrize("multirun_exit, exit_code", [("1", 1), ("2", 1), ("3", 0), ("124", 0)])
def test_mad_fails_where_its_multirun_failed(multirun_exit, exit_code, tmp_path):
    """mad/run.sh said the multirun's exit code and exited 0 whatever it was; a failed run or a bad setting is
    exit code 1 now, diverged runs (3) and a stop by STOP_AFTER_S (124) are not."""
    done = run_script(tmp_path, ["docs/results/mad/run.sh", "mad_recall", "attention"], f"exit {multirun_exit}",
                      MPS="0")
    assert done.returncode == exit_code, done.stdout + done.stderr
    assert f"multirun: exit code {multirun_exit}" in done.stdout
    assert (tmp_path / "out" / "mad.tar.gz").exists()


def test_chosen_rates_fails_where_a_folder_name_does_not_give_the_model(tmp_path):
    """A run folder's name is cut at 120 bytes: with long overrides before `model=` (sorted by key) it gave
    `gated_del...` as the model to run.sh (or crashed with an AttributeError where `model=` was cut off)."""
    for run in REPORTED_RUNS.glob("model.d_model=256,model=gated_deltanet,*"):
        name = "callbacks.early_stopping.patience=2000,callbacks.early_stopping.threshold=0.999,logger.kind=csv," \
               + run.name[:38] + "...-" + run.name.rsplit("-", 1)[1]
        shutil.copytree(run, tmp_path / name)
    done = chosen_rates(tmp_path)
    assert done.returncode == 1 and "its folder's name gives no model" in done.stderr, done.stdout + done.stderr
