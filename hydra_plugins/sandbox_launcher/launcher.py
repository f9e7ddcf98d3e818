"""The Hydra launcher of `sandbox-train -m` (conf/hydra/launcher/sandbox.yaml): Hydra's jobs one after the other,
except that on a GPU the runs that differ only in `seed`, `optim.lr` and `optim.weight_decay` train together as
stacked runs (`sandbox.stacked_run`): one process, one set of kernel launches for all of them.

    sandbox-train -m experiment=zoology                          # attention stacked on a GPU, others one at a time
    sandbox-train -m experiment=zoology hydra.launcher.stack=false
    sandbox-train -m experiment=zoology hydra.launcher.max_runs=8

Settings (hydra.launcher.*): `stack` auto (stack where the runs train on a CUDA device and stacking measured
faster: `sandbox.stacked_run.STACK_PAYS`), true or false;
`max_runs`, the most runs in one stack (a larger group is cut into stacks of at most this many). Every job gets
its folder, its config and its Hydra return value as under Hydra's basic launcher. Every job's settings are
checked before any job trains: one bad job stops the whole multirun with its error (exit 2), nothing trained and
no job's folder left (Hydra has written the sweep's multirun.yaml by then). A stack that fails with an error is
said so and its runs are run again one at a time, so one run's failure never loses the others; one whose
checkpoint was written at another precision or on other kernels fails its jobs with that error, and the others
go on.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class SandboxLauncher(Launcher):
    def __init__(self, stack="auto", max_runs: int = 16) -> None:
        if not (stack == "auto" or isinstance(stack, bool)):  # `in (True, False)` would take 1 and 0
            raise ValueError(f"hydra.launcher.stack={stack!r} is invalid: must be auto, true or false")
        if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
            raise ValueError(f"hydra.launcher.max_runs={max_runs!r} is invalid: must be an integer >= 1")
        self.stack, self.max_runs = stack, max_runs
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sandbox import runs
        from sandbox.stacked_run import stack_key, stacks

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = []
        try:
            for i, overrides in enumerate(job_overrides):
                jobs.append(self._prepare(initial_job_idx + i, overrides))
                _check_job(jobs[-1][1], overrides)
        except BaseException:  # before any job trained: the folders made for the jobs go again
            for _, _, run_dir in jobs:
                runs.remove_empty_folders(runs.new_folders(run_dir))
            raise
        groups: dict[str, list[int]] = {}
        for i, (_, cfg, _) in enumerate(jobs):
            key = stack_key(cfg) if stacks(cfg, self.stack) else f"alone {i}"
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.max_runs):
                self._run([jobs[i] for i in members[start:start + self.max_runs]])
        return [ret for ret, _, _ in jobs]

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

    def _run(self, jobs: list[tuple[JobReturn, DictConfig, Path]]) -> None:
        from sandbox.runs import say
        from sandbox.stacked_run import train_stack
        from sandbox.train import OtherComputation, report_result, run_alone

        if len(jobs) > 1:
            try:
                results = train_stack([cfg for _, cfg, _ in jobs], [run_dir for _, _, run_dir in jobs])
            except OtherComputation as err:  # its checkpoint cannot go on here, nor can its runs alone
                for ret, _, _ in jobs:
                    ret.return_value, ret.status = err, JobStatus.FAILED
                return
            except Exception as err:  # noqa: BLE001 (each run is tried alone, which reports its own error)
                say(f"a stack of {len(jobs)} runs failed ({type(err).__name__}: {err}); running them one at a time",
                    error=True)
            else:
                for (ret, _, run_dir), result in zip(jobs, results):
                    ret.return_value, ret.status = report_result(run_dir, result), JobStatus.COMPLETED
                return
        for ret, cfg, run_dir in jobs:
            try:
                ret.return_value, ret.status = run_alone(cfg, run_dir), JobStatus.COMPLETED
            except Exception as err:  # noqa: BLE001 (as Hydra's run_job: the sweep raises it after the others)
                ret.return_value, ret.status = err, JobStatus.FAILED
