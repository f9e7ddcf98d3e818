"""The Hydra launcher of `sandbox-train -m` (conf/hydra/launcher/sandbox.yaml): Hydra's jobs one after the other,
except that on a GPU the runs that differ only in `seed`, `optim.lr` and `optim.weight_decay` train together as
stacked runs (`sandbox.stacked_run`): one process, one set of kernel launches for all of them; and that where a
CUDA MPS daemon runs, the jobs (and stacks) train in several processes at once, their kernels sharing the GPU
(jobs whose runs have ended, as in a multirun given again, are returned by the launcher itself).

    sandbox-train -m experiment=zoology                          # attention stacked on a GPU, others one at a time
    sandbox-train -m experiment=zoology hydra.launcher.stack=false
    sandbox-train -m experiment=zoology hydra.launcher.max_runs=8
    sandbox-train -m experiment=zoology hydra.launcher.processes=6

Settings (hydra.launcher.*): `stack` auto (stack where the runs train on a CUDA device and stacking measured
faster: `sandbox.stacked_run.STACK_PAYS`), true or false;
`max_runs`, the most runs in one stack (a larger group is cut into stacks of at most this many);
`processes`, how many jobs or stacks train at once, each in its own process: auto (MPS_PROCESSES where the jobs
train on one CUDA device and a CUDA MPS daemon answers, else 1) or a whole number >= 1. Without MPS the GPU
time-slices processes, which measured no faster than one at a time (docs/results/throughput/README.md, "CUDA MPS").
Every job gets its folder, its config and its Hydra return value as under Hydra's basic launcher. Every job's
settings are checked before any job trains: one bad job stops the whole multirun with its error (exit 2), nothing
trained and no job's folder left (Hydra has written the sweep's multirun.yaml by then). A stack that fails with
an error is said so and its runs are run again one at a time, so one run's failure never loses the others; one
whose checkpoint was written at another precision or on other kernels fails its jobs with that error, and the
others go on. A process that dies without a word (killed, out of host memory) fails its jobs and the others go
on; SIGTERM or SIGINT to the launcher reaches every process, each run ends interrupted with its checkpoint, and
the multirun ends as one interrupted in a single process does (one while the jobs are composed and checked stops the
command before any trains). A failing job's error carries the traceback of the process that trained it; each
failed job is named in a line of its own, since Hydra raises the first one's error alone.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import traceback
from collections.abc import Sequence
from multiprocessing.connection import wait
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict


def _check_job(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A job's settings, as `sandbox-train` checks one run's; its error names the job by its overrides."""
    from sandbox.settings import ConfigError, check_settings

    try:
        check_settings(cfg)
    except ConfigError as err:
        raise ConfigError(f"the job {' '.join(overrides)}: {err}") from err


def _check_sweeps(config: DictConfig, hydra_context) -> None:
    """Every sweep of the multirun (on the command line or in hydra.sweeper.params) takes a value: one that takes
    none (range(3,0), a glob that matches no option) makes no job, and Hydra's sweeper then ends without a word,
    exit code 0. Checked as the launcher is set up, before the sweeper writes anything."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sandbox.settings import ConfigError

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    for override in OverridesParser.create(config_loader=hydra_context.config_loader).parse_overrides(arguments):
        if override.is_sweep_override() and not list(override.sweep_string_iterator()):
            raise ConfigError(f"{override.input_line} is invalid: it sweeps no values, so the multirun would run no "
                              "job: give it at least one (range(0,3), or a glob that matches an option)")


# Processes packed under MPS by `processes=auto`: 6 to 8 packed runs gave 1.28-1.55x the run-steps per second of
# the same runs time-sliced, at d_model 64 and 256 on an H100 (docs/results/throughput/mps_h100_c32b745/).
MPS_PROCESSES = 6


def mps_daemon_runs() -> bool:
    """Whether a CUDA MPS daemon answers on this machine (its control pipe, where CUDA looks for it)."""
    return (Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")) / "control").is_fifo()


# The signals that interrupt a multirun (sandbox.callbacks.Interruption).
SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _signals_kept():
    """SIGTERM and SIGINT only noted (the list yielded) while this runs: a KeyboardInterrupt raised anywhere, as in
    OmegaConf halfway through composing a job, could leave a broken config and report it as a bad setting."""
    signalled = []
    previous = {signum: signal.signal(signum, lambda signum, frame: signalled.append(signum)) for signum in SIGNALS}
    try:
        yield signalled
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # `True` is an int too


class SandboxLauncher(Launcher):
    def __init__(self, stack="auto", max_runs: int = 16, processes="auto") -> None:
        if not (stack == "auto" or isinstance(stack, bool)):  # `in (True, False)` would take 1 and 0
            raise ValueError(f"hydra.launcher.stack={stack!r} is invalid: must be auto, true or false")
        if not _whole_number(max_runs) or max_runs < 1:
            raise ValueError(f"hydra.launcher.max_runs={max_runs!r} is invalid: must be an integer >= 1")
        if not (processes == "auto" or _whole_number(processes) and processes >= 1):
            raise ValueError(f"hydra.launcher.processes={processes!r} is invalid: must be auto or an integer >= 1")
        self.stack, self.max_runs, self.processes = stack, max_runs, processes
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        _check_sweeps(config, hydra_context)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sandbox import runs
        from sandbox.callbacks import RunInterrupted
        from sandbox.stacked_run import stack_key, stacks

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = []
        try:
            with _signals_kept() as signalled:  # a signal stops the command between two jobs
                for i, overrides in enumerate(job_overrides):
                    if signalled:
                        break
                    jobs.append(self._prepare(initial_job_idx + i, overrides))
                    _check_job(jobs[-1][1], overrides)
                processes = self._processes([cfg for _, cfg, _ in jobs])
            if signalled:
                runs.say(f"interrupted by {signal.Signals(signalled[0]).name} before any job trained; run the same "
                         "command to run them", error=True)
                raise RunInterrupted(signalled[0])
        except BaseException:  # before any job trained: the folders made for the jobs go again
            for _, _, run_dir in jobs:
                runs.remove_empty_folders(runs.new_folders(run_dir))
            raise
        groups: dict[str, list[int]] = {}
        for i, (_, cfg, _) in enumerate(jobs):
            key = stack_key(cfg) if stacks(cfg, self.stack) else f"alone {i}"
            groups.setdefault(key, []).append(i)
        units = [[jobs[i] for i in members[start:start + self.max_runs]]
                 for members in groups.values() for start in range(0, len(members), self.max_runs)]
        if processes > 1:  # ended runs are returned here: a process's start and imports took 15-25 s each
            for unit in [unit for unit in units if _ended(unit)]:
                units.remove(unit)
                _finish(unit, _outcomes(unit))
        if processes == 1 or len(units) == 1:
            for unit in units:
                _finish(unit, _outcomes(unit))
        else:
            _run_packed(units, processes)
        return [ret for ret, _, _ in jobs]

    def _processes(self, cfgs: list[DictConfig]) -> int:
        """How many jobs train at once: `processes`, where auto is MPS_PROCESSES on one CUDA device under MPS."""
        from sandbox.settings import ConfigError, one_device
        from sandbox.stacked_run import trains_on_cuda

        several = next((cfg for cfg in cfgs if not one_device(cfg.trainer)), None)
        if self.processes == "auto":
            packs = several is None and all(trains_on_cuda(cfg) for cfg in cfgs) and mps_daemon_runs()
            return MPS_PROCESSES if packs else 1
        if self.processes > 1 and several is not None:  # its strategy would launch the whole command again
            raise ConfigError(f"hydra.launcher.processes={self.processes} cannot train a job on several devices "
                              f"(trainer.devices={several.trainer.devices}): use processes=1")
        return self.processes

    def _prepare(self, idx: int, overrides: Sequence[str]) -> tuple[JobReturn, DictConfig, Path]:
        """A job as Hydra's run_job makes it (its folder, its config; nothing trained yet)."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
        prepared = {}

        def keep(cfg: DictConfig) -> None:
            prepared["cfg"], prepared["dir"] = cfg, Path(HydraConfig.get().runtime.output_dir)

        ret = run_job(hydra_context=self.hydra_context, task_function=keep, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        if ret.status != JobStatus.COMPLETED:  # the config did not resolve: Hydra's own error
            ret.return_value  # noqa: B018 (raises it)
        ret.status = JobStatus.UNKNOWN
        return ret, prepared["cfg"], prepared["dir"]


Job = tuple[JobReturn, DictConfig, Path]


def _ended(unit: list[Job]) -> bool:
    """Whether every run of the unit has ended by its result.json (finished, diverged, ...): training returns
    such runs as they are (or refuses a result of another configuration) without training anything."""
    from sandbox.results import TERMINAL, status_of
    from sandbox.runs import stored_result

    return all((result := stored_result(run_dir)) is not None and status_of(result) in TERMINAL
               for _, _, run_dir in unit)


def _outcomes(unit: list[Job]) -> list[tuple[str, object]]:
    """Train a unit (one job, or a stack of jobs) here; each job's outcome: ("result", its result), ("bad setting",
    the error's line) or ("failed", the error). A signal ends it with RunInterrupted, after the interrupted runs
    have recorded their end."""
    from sandbox.runs import say
    from sandbox.settings import ConfigError
    from sandbox.stacked_run import train_stack
    from sandbox.train import OtherComputation, train

    cfgs, run_dirs = [cfg for _, cfg, _ in unit], [run_dir for _, _, run_dir in unit]
    if len(unit) > 1:
        try:
            return [("result", result) for result in train_stack(cfgs, run_dirs)]
        except OtherComputation as err:  # its checkpoint cannot go on here, nor can its runs alone
            return [("failed", err)] * len(unit)
        except Exception as err:  # noqa: BLE001 (each run is tried alone, which reports its own error)
            say(f"a stack of {len(unit)} runs failed ({type(err).__name__}: {err}); running them one at a time",
                error=True)
    outcomes = []
    for cfg, run_dir in zip(cfgs, run_dirs):
        try:
            outcomes.append(("result", train(cfg, run_dir)))
        except ConfigError as err:  # found in training (a checkpoint of another configuration): as sandbox-train
            outcomes.append(("bad setting", str(err)))
        except Exception as err:  # noqa: BLE001 (as Hydra's run_job: the sweep raises it after the others)
            outcomes.append(("failed", err))
    return outcomes


def _finish(unit: list[Job], outcomes: list[tuple[str, object]]) -> None:
    """Each job's Hydra return value and status from its outcome, its end said as `sandbox-train` says it. A failed
    job is named in a line of its own: Hydra raises the error of the first failed job alone, after every job."""
    from sandbox.runs import say
    from sandbox.train import bad_setting, report_result

    for (ret, _, run_dir), (kind, outcome) in zip(unit, outcomes):
        if kind == "result":
            ret.return_value, ret.status = report_result(run_dir, outcome), JobStatus.COMPLETED
        elif kind == "bad setting":
            ret.return_value, ret.status = bad_setting(outcome), JobStatus.COMPLETED
        else:
            say(f"{run_dir}: failed: {_failure_line(outcome)}", error=True)
            ret.return_value, ret.status = outcome, JobStatus.FAILED


# how `_sendable` joins a packed process's error to its traceback
_PACKED_TRACEBACK = "\n\nIn the process that trained it:\n"


def _failure_line(err: BaseException) -> str:
    """A failed job's error as its type and first sentence; a packed process's (`_sendable`) as the error it sent,
    which starts with its own type, without its traceback."""
    from sandbox.runs import describe_error, first_sentence

    sent, packed, _ = str(err).partition(_PACKED_TRACEBACK)
    return first_sentence(sent) if packed else describe_error(err)


def _train_in_child(unit: list[Job], pipe) -> None:
    """A packed process: trains its unit and sends back the outcomes, or the signal that interrupted it."""
    os.setpgrp()  # out of the terminal's group: a Ctrl-C reaches it once, forwarded by the launcher
    ret = unit[0][0]
    configure_log(ret.hydra_cfg.hydra.job_logging, ret.hydra_cfg.hydra.verbose)  # as Hydra's run_job does
    from sandbox.callbacks import RunInterrupted

    def stop(signum, frame):  # outside a run (before it, between two): as a run stops before training
        raise RunInterrupted(signum)

    for signum in SIGNALS:
        signal.signal(signum, stop)
    try:
        outcomes = _outcomes(unit)
    except RunInterrupted as stopped:
        pipe.send(("interrupted", stopped.signum))
        return
    for signum in SIGNALS:  # its runs have ended, recorded: the message goes whole (the launcher knows its signal)
        signal.signal(signum, signal.SIG_IGN)
    pipe.send(("done", [(kind, _sendable(outcome) if kind == "failed" else outcome) for kind, outcome in outcomes]))


def _sendable(err: BaseException) -> RuntimeError:
    """An error of a packed process as its type, message and traceback (not every exception pickles, and the
    traceback shows where it failed, as one raised in the launcher's process does)."""
    return RuntimeError(f"{type(err).__name__}: {err}{_PACKED_TRACEBACK}" + "".join(traceback.format_exception(err)))


def _run_packed(units: list[list[Job]], processes: int) -> None:
    """The units, at most `processes` at once, each in a process of its own (spawned: CUDA cannot be forked).
    A unit whose run folder another running unit trains waits for it (a job given twice trains once)."""
    from sandbox.callbacks import RunInterrupted

    context = multiprocessing.get_context("spawn")
    waiting, running = list(units), {}  # running: the pipe from its process -> (process, unit)
    signalled = []

    def forward(signum, frame):  # every process ends its runs interrupted, as one process would
        signalled.append(signum)
        for process, _ in running.values():
            if process.is_alive():
                os.kill(process.pid, signum)

    def folders(units_) -> set[Path]:
        return {run_dir for unit in units_ for _, _, run_dir in unit}

    previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        while waiting or running:
            for unit in list(waiting):
                if len(running) < processes and not signalled and not folders([unit]) & folders(
                        u for _, u in running.values()):
                    waiting.remove(unit)
                    receive, send = context.Pipe(duplex=False)
                    process = context.Process(target=_train_in_child, args=(unit, send))
                    process.start()
                    send.close()  # the parent's copy: the pipe then reads EOF when the process ends
                    running[receive] = (process, unit)
                    if signalled:  # came as it started, before `forward` could see it
                        os.kill(process.pid, signalled[0])
            if not running:
                break  # signalled before the waiting units started: they stay untrained
            for receive in wait(list(running)):  # ready: a message, or EOF from a process that ended without one
                process, unit = running.pop(receive)
                try:
                    message = receive.recv()
                except EOFError:
                    message = None
                process.join()
                if message is None:
                    died = RuntimeError(f"the process training it ended without a result (exit code "
                                        f"{process.exitcode}); its run folder may hold an earlier segment's")
                    _finish(unit, [("failed", died)] * len(unit))
                elif message[0] == "done":
                    _finish(unit, message[1])
                else:
                    signalled.append(message[1])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for process, _ in running.values():  # the launcher failed: its runs end interrupted, to resume
            process.terminate()
            process.join()
    if signalled:
        raise RunInterrupted(signalled[0])
