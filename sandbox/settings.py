"""Every static check of a composed training config, in one place.

`check_settings(cfg)` runs before any work (data, model, trainer, run folder) and raises `ConfigError`, one
line naming the setting and what is valid, for the first setting that is nonsense: of the wrong type, out of
range, unknown, missing, or meaningless together with the others (a run that would never train or never
validate, a precision this machine would silently replace). Model and task settings are checked by the
model zoo and the task registry themselves (the model is built on the meta device: no memory, no time).
"""

import inspect
import logging
import math
import os
import re
import warnings
from collections.abc import Callable
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from omegaconf import DictConfig, OmegaConf

import kernels
from models import MIXERS, LanguageModel, build_model
from sandbox.results import MAD_SUITE, NAME_MAX, names_fit
from tasks.common import physical_memory
from tasks.registry import available, check_fits_memory, check_shared, model_shape, resolve
from tasks.splits import SEEDS_PER_SPLIT, SPLITS


class ConfigError(ValueError):
    """A setting the user can fix; reported as one line with exit code 2."""


def one_line(err: BaseException) -> str:
    """An exception and its cause as one line, without Hydra's search-path listing."""
    # a ConfigError of our run_id resolver, which OmegaConf wraps (twice); a ConfigError itself says it all, even
    # one raised while another was handled
    inner = None if isinstance(err, ConfigError) else err.__context__
    while inner is not None:
        if isinstance(inner, ConfigError):
            return str(inner)
        inner = inner.__context__
    text = re.sub(r"\s+", " ", str(err)).strip()
    cause = "" if err.__cause__ is None else re.sub(r"\s+", " ", str(err.__cause__)).strip()
    if cause not in text:
        text = f"{text} {cause}"
    return text.split("Config search path")[0].strip()


class Rule(NamedTuple):
    ok: Callable[[object], bool]
    valid: str  # what a valid value is, as the message says it


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: int | None = None) -> Rule:
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(lambda v: _is_int(v) and v >= low and (high is None or v <= high), valid)


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number between low and high (open or closed at either end)."""
    if high == math.inf:
        valid = f"a finite number {'>' if low_open else '>='} {low}"
    else:
        valid = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def ok(v) -> bool:
        return (_is_number(v) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))
    return Rule(ok, valid)


def one_of(*values) -> Rule:
    return Rule(lambda v: not isinstance(v, bool) and v in values, "one of " + ", ".join(map(str, values)))


def nullable(rule: Rule, meaning: str = "null") -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.valid} or {meaning}")


def _path_text(value) -> str | None:
    """A value as Hydra writes it into a path (a string or a number), or None."""
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


FRACTION = number(0, 1, low_open=True)
FLAG = Rule(lambda v: isinstance(v, bool), "true or false")
# Lightning's two readings of a limit or interval: a float is a fraction of an epoch, an int a count of batches.
BATCHES = Rule(lambda v: FRACTION.ok(v) or integer(1).ok(v),
               "a fraction in (0, 1] or a number of batches (an integer >= 1)")
BETAS = Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(number(0, 1, high_open=True).ok(b) for b in v),
             "two numbers in [0, 1), e.g. [0.9, 0.98]")
DEVICES = Rule(lambda v: v == "auto" or (_is_int(v) and (v == -1 or v >= 1))
               or (isinstance(v, list) and len(v) > 0 and all(integer(0).ok(i) for i in v)),
               "auto, -1 (every device), a number of devices (an integer >= 1) or a list of device indices")
# Lightning's precision names and the short forms it also takes (16 is 16-mixed), and ours: auto.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
PRECISION_ALIASES = (16, 32, 64, "16", "32", "64", "bf16")
FLOAT16 = ("16-mixed", 16, "16", "16-true")
FLOAT64 = ("64-true", 64, "64")

SETTINGS: dict[str, Rule] = {
    # the run folder is ${output_root}/${name}/<overrides>-<hash>: name must not lead out of output_root
    "output_root": Rule(lambda v: bool(_path_text(v)) and names_fit(_path_text(v)),
                        f"a folder path (not empty, each folder name at most {NAME_MAX} bytes)"),
    "name": Rule(lambda v: _path_text(v) not in (None, "", ".", "..") and os.sep not in _path_text(v)
                 and names_fit(_path_text(v)),
                 f"one folder name (not empty, no {os.sep}, not . or .., at most {NAME_MAX} bytes)"),
    "seed": integer(0, SEEDS_PER_SPLIT - 1),  # the task splits' seed ranges (tasks/splits.py)
    # sandbox-report reads no other suite: another label would drop the runs from its MAD section unseen
    "suite": Rule(lambda v: v is None or v == MAD_SUITE, f"null (no suite) or {MAD_SUITE} (experiment=mad's tasks)"),
    "cuda_graphs": Rule(lambda v: v is True or v is False or v == "auto", "auto, true or false"),
    "optim.lr": number(0, low_open=True),
    "optim.weight_decay": number(0),
    "optim.betas": BETAS,
    "optim.warmup_ratio": number(0, 1, high_open=True),
    "optim.min_lr_ratio": number(0, 1),
    "task.batch_size": integer(1),
    "task.eval_batch_size": nullable(integer(1), "null (the training batch size)"),
    "task.limit_examples": nullable(integer(1)),
    "trainer.accelerator": one_of("auto", *sorted(AcceleratorRegistry.available_accelerators()), "gpu"),
    "trainer.devices": DEVICES,
    "trainer.strategy": Rule(one_of("auto", "ddp").ok, "auto or ddp (trainer=ddp); strategies that spawn or fork "
                             "train in child processes, which the run's record does not see"),
    "trainer.precision": Rule(lambda v: not isinstance(v, bool) and v in PRECISIONS + PRECISION_ALIASES,
                              "one of " + ", ".join(PRECISIONS)),
    "trainer.max_epochs": integer(1),
    "trainer.max_steps": Rule(lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (no limit) or an integer >= 1"),
    "trainer.gradient_clip_val": nullable(number(0), "null (0 and null: no clipping)"),
    "trainer.log_every_n_steps": integer(1),
    "trainer.check_val_every_n_epoch": nullable(integer(1)),
    "trainer.val_check_interval": BATCHES,
    "trainer.limit_train_batches": BATCHES,
    "trainer.limit_val_batches": BATCHES,
    "trainer.limit_test_batches": BATCHES,
    "trainer.num_sanity_val_steps": integer(-1),
    "callbacks.early_stopping.threshold": FRACTION,
    "callbacks.early_stopping.patience": integer(0),
    "callbacks.progress": one_of("auto", "rich", "lines", "none"),
    "logger.kind": one_of("csv", "tensorboard"),
}
# Trainer keys sandbox.train sets itself; any other lightning.Trainer argument may be added (+trainer.KEY=...)
# and is checked by Lightning, or by ADDED_TRAINER_SETTINGS where Lightning does not check it.
TRAINER_SET_BY_SANDBOX = ("logger", "callbacks", "default_root_dir", "enable_progress_bar", "enable_model_summary",
                          "use_distributed_sampler")
# Lightning arguments that may be added (+trainer.KEY=...) and that Lightning takes for a run the sandbox cannot
# run or record as asked; checked when given.
ADDED_TRAINER_SETTINGS: dict[str, Rule] = {
    "trainer.num_nodes": Rule(integer(1, 1).ok, "1 (the sandbox trains on one machine)"),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.min_epochs": nullable(integer(0)),
    "trainer.min_steps": nullable(integer(0)),
    "trainer.overfit_batches": Rule(lambda v: (_is_number(v) and v == 0) or BATCHES.ok(v), f"0 (off), {BATCHES.valid}"),
    "trainer.fast_dev_run": Rule(lambda v: v in (False, 0),
                                 "false: debug=fast runs any configuration on a few batches, and records it"),
    "trainer.deterministic": Rule(lambda v: v is None or isinstance(v, bool) or v == "warn",
                                  "true, false, warn or null"),
    # Lightning's true/false arguments, which it takes unchecked: a word is taken as true, a number is a traceback
    # once the run has begun (benchmark, detect_anomaly).
    **{f"trainer.{name}": FLAG if arg.annotation is bool else Rule(nullable(FLAG).ok, "true, false or null")
       for name, arg in inspect.signature(L.Trainer.__init__).parameters.items()
       if arg.annotation in (bool, bool | None) and name not in TRAINER_SET_BY_SANDBOX},
}
# Sections whose keys are checked by their own code below: the task registry and the model zoo.
DELEGATED = ("task.name", "task.params", "task.segments", "model")
# Keys whose value is a mapping: the sections of the dotted keys, and those of DELEGATED that are mappings.
SECTIONS = {key.rpartition(".")[0] for key in (*SETTINGS, *DELEGATED)} - {""} | {"task.params", "task.segments",
                                                                             "model"}


def check_settings(cfg: DictConfig) -> None:
    """Raise ConfigError for the first setting of `cfg` (a composed train config) that is not valid."""
    settings = _flatten(OmegaConf.to_container(cfg, resolve=True))
    _check_keys(settings)
    for key, rule in SETTINGS.items():
        _check_value(key, settings[key], rule)
    for key, rule in ADDED_TRAINER_SETTINGS.items():
        if key in settings:
            _check_value(key, settings[key], rule)
    _check_machine(settings)
    _check_interval(settings)  # before Lightning's own message on it, which names no setting
    shape, sizes = _check_task(cfg)
    _check_model(cfg, shape)
    processes = _check_trainer(cfg)
    _check_schedule(settings, sizes, processes)  # after: each process evaluates its own share of the data


def check_run_folder(cfg: DictConfig) -> None:
    """output_root and name, which make the run folder's path: checked before Hydra makes that folder."""
    for key in ("output_root", "name"):
        _check_value(key, cfg[key], SETTINGS[key])


def _check_value(key: str, value, rule: Rule) -> None:
    if not rule.ok(value):
        raise ConfigError(f"{key}={_show(value)} is invalid: must be {rule.valid}")


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted keys to values; lists, and the sections of DELEGATED, are values."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        # a trainer.KEY is one Lightning argument, whatever its value (max_time={minutes: 5})
        if isinstance(value, dict) and path not in DELEGATED and prefix != "trainer.":
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _check_keys(settings: dict) -> None:
    trainer_args = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", *TRAINER_SET_BY_SANDBOX}
    for key, value in settings.items():
        if key in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{key}={_show(value)} is invalid: must be a mapping of settings, as in conf/ (to set "
                              f"one of them: {key}.KEY=VALUE)")
        section, _, name = key.partition(".")
        if key in SETTINGS or key in DELEGATED or (section == "trainer" and name in trainer_args):
            continue
        known = sorted(k.partition(".")[2] for k in (*SETTINGS, *DELEGATED) if k.startswith(f"{section}."))
        if not name or not known:
            top_level = sorted({k.partition(".")[0] for k in (*SETTINGS, *DELEGATED)})
            raise ConfigError(f"{key} is not a setting of the sandbox: the top-level keys are {', '.join(top_level)}")
        valid = f"valid keys of {section}: {', '.join(known)}"
        if section == "trainer":
            valid += ", or another lightning.Trainer argument"
        raise ConfigError(f"{key} is not a setting of the sandbox: {valid}")
    missing = [key for key in (*SETTINGS, *DELEGATED) if key not in settings]
    if missing:
        raise ConfigError(f"{missing[0]} is missing: it must be set (the defaults are in conf/)")


def _show(value) -> str:
    """A value as the user writes it: null, true and false; quotes for a string that would read as another type
    unquoted (empty, a number, null, true or false): `num_examples='10'` is refused for being a string."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, str) and _reads_as_another_type(value) else str(value)


def _reads_as_another_type(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text.strip().lower() in ("", "null", "none", "true", "false")


def _runs_on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def _check_machine(settings: dict) -> None:
    """Settings this machine cannot run as asked."""
    accelerator, precision, devices = (settings[f"trainer.{k}"] for k in ("accelerator", "precision", "devices"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} is invalid on this machine (no CUDA device): "
                          "use auto or cpu")
    if accelerator in ("mps", "tpu") and not AcceleratorRegistry[accelerator]["accelerator"].is_available():
        # else Lightning's error once the data is made (tpu without torch_xla: a traceback)
        raise ConfigError(f"trainer.accelerator={accelerator} is invalid on this machine (no {accelerator} device): "
                          "use auto or cpu")
    if _runs_on_cpu(accelerator) and not (devices == "auto" or integer(1).ok(devices)):
        raise ConfigError(f"trainer.devices={devices} is invalid on the CPU: must be auto or a number of processes "
                          "(an integer >= 1)")
    if precision in FLOAT16 and _runs_on_cpu(accelerator):
        # Lightning would run 16-mixed as bf16-mixed (and the result record 16-mixed); 16-true diverges on the CPU.
        raise ConfigError(f"trainer.precision={precision} is invalid on the CPU (float16 precision needs a "
                          "CUDA device): use auto (32-true on the CPU), 32-true or bf16-mixed")
    if settings["cuda_graphs"] is True:
        trainer = {k.partition(".")[2]: v for k, v in settings.items() if k.startswith("trainer.")}
        problem = graphs_problem(trainer)
        if problem:
            raise ConfigError(f"cuda_graphs=true is invalid {problem}")
    backend = settings["model"].get("backend", "auto")
    device = "cpu" if _runs_on_cpu(accelerator) else "cuda"
    if kernels.on_triton(backend):  # else the first training step fails
        try:
            kernels.resolve_backend(backend, device)
        except ValueError as err:
            raise ConfigError(f"model.backend={backend} is invalid on this machine: {err}; auto or torch run on "
                              "the CPU") from err
    # The Triton kernels compute in float32 and refuse float64 at the first step; attention runs torch's own op.
    mixer = settings["model"].get("mixer")
    kernel_mixer = isinstance(mixer, str) and mixer in MIXERS and mixer != "attention"
    if (precision in FLOAT64 and kernel_mixer and backend in kernels.BACKENDS
            and kernels.on_triton(kernels.resolve_backend(backend, device))):
        on_cuda = " (the Triton kernels on CUDA)" if backend == "auto" else ""
        raise ConfigError(f"trainer.precision={precision} is invalid with model.backend={backend}{on_cuda}: the "
                          "Triton kernels compute in float32; use model.backend=torch for float64, or 32-true")


def precision_used(setting: str) -> str:
    """The precision a run trains at: trainer.precision, `auto` resolved for this machine."""
    if setting == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return setting


def trainer_arguments(cfg: DictConfig) -> dict:
    """A run's Lightning Trainer arguments but its folder, logger, callbacks and progress bar: trainer.* (a
    +trainer.KEY among them) at the precision used, and the sandbox's own."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer["precision"] = precision_used(trainer["precision"])
    # use_distributed_sampler: RecallDataModule gives each process its own shard
    return {**trainer, "enable_model_summary": False, "use_distributed_sampler": False}


def _check_trainer(cfg: DictConfig) -> int:
    """Lightning's own checks of its arguments, which it makes as a trainer is built: here on one built and
    dropped, with the kinds of logger and callbacks that sandbox.train gives it, so that they come before any data
    is made, and before any job of a multirun or trial of a sweep trains. Returns the number of processes."""
    trainer = trainer_arguments(cfg)
    for key in ("deterministic", "benchmark"):  # checked above; Lightning would set torch's global flags from them
        trainer.pop(key, None)
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    try:
        with warnings.catch_warnings():  # Lightning's notes on the settings come with the run's own trainer
            warnings.simplefilter("ignore")
            quiet.setLevel(logging.WARNING)
            built = L.Trainer(**trainer, logger=True, callbacks=[ModelCheckpoint(monitor=None)],
                              enable_progress_bar=False)
    except Exception as err:  # noqa: BLE001 (a wrong type is an AttributeError or TypeError in Lightning)
        given = OmegaConf.to_container(cfg.trainer, resolve=True)
        added = [f"trainer.{k}={_show(v)}" for k, v in given.items() if f"trainer.{k}" not in SETTINGS]
        raise ConfigError(f"trainer: {one_line(err)}" + (f" (Lightning arguments added: {', '.join(added)})"
                                                if added else "")) from err
    finally:
        quiet.setLevel(level)
    timer = next((c for c in built.callbacks if isinstance(c, Timer)), None)
    if timer is not None and timer.time_remaining() <= 0:  # a run that would stop before its first step
        raise ConfigError(f"trainer.max_time={_show(cfg.trainer.max_time)} is invalid: must be a duration > 0 "
                          "(DD:HH:MM:SS, or e.g. {hours: 1}), or null for no limit")
    processes = built.num_devices * built.num_nodes
    if cfg.task.batch_size % processes:
        raise ConfigError(f"task.batch_size={cfg.task.batch_size} is invalid with {processes} processes: it is the "
                          f"global batch and must be a multiple of {processes}")
    return processes


def one_device(trainer) -> bool:
    """Whether a trainer config (a mapping: trainer.devices, trainer.num_nodes if given) trains on one device."""
    return trainer["devices"] in (1, "1") and trainer.get("num_nodes", 1) == 1


def graphs_problem(trainer) -> str | None:
    """Why CUDA graphs over the training step cannot run with this trainer config (a mapping), as the end of a
    sentence, or None (sandbox/graphs.py says why each is excluded)."""
    if _runs_on_cpu(trainer["accelerator"]):
        return "on the CPU (CUDA graphs need a CUDA device): use false or auto"
    if not one_device(trainer):
        return (f"with trainer.devices={_show(trainer['devices'])}: the graphs run on one device (devices=1), or use "
                "cuda_graphs=false or auto")
    if trainer["precision"] in FLOAT16:
        return (f"with trainer.precision={trainer['precision']} (float16 is not graphed: its loss scaling reads the "
                "host every step): use bf16-mixed or 32-true")
    if trainer.get("accumulate_grad_batches", 1) != 1:
        return (f"with trainer.accumulate_grad_batches={trainer['accumulate_grad_batches']}: a graph's gradients are "
                "overwritten by the next batch's (use 1, or cuda_graphs=false or auto)")
    return None


def uses_cuda_graphs(cfg: DictConfig) -> bool:
    """Whether a run (settings checked) trains from CUDA graphs: cuda_graphs=true; auto: wherever they can run."""
    return cfg.cuda_graphs is True or (cfg.cuda_graphs == "auto" and graphs_problem(cfg.trainer) is None)


def _check_task(cfg: DictConfig) -> tuple[dict, dict[str, int]]:
    """Each segment through the task registry's own checks. Returns the largest vocabulary and sequence
    length (what the model is built for) and each split's number of examples."""
    task = cfg.task
    segments = OmegaConf.to_container(task.segments, resolve=True)
    params = OmegaConf.to_container(task.params, resolve=True)
    if task.name not in available():
        raise ConfigError(f"task.name={_show(task.name)} is invalid: must be one of {', '.join(available())}")
    unknown = [s for s in segments if s not in SPLITS]
    if unknown:
        raise ConfigError(f"task.segments.{unknown[0]} is not a split: the splits are {', '.join(SPLITS)}")
    missing = [s for s in SPLITS if not segments.get(s)]
    if missing:
        raise ConfigError(f"task.segments: no segments for split(s) {missing}; give each of {list(SPLITS)}")
    sizes = dict.fromkeys(SPLITS, 0)
    for split in SPLITS:
        longest = 0
        if not isinstance(segments[split], list):
            raise ConfigError(f"task.segments.{split}={segments[split]} is invalid: must be a list of segments")
        for i, segment in enumerate(segments[split]):
            where = f"task.segments.{split}[{i}]"
            if not isinstance(segment, dict):
                raise ConfigError(f"{where}={segment} is invalid: must be a mapping such as "
                                  "{seq_len: 64, num_kv_pairs: 4, num_examples: 1000}")
            segment = dict(segment)
            num_examples = segment.pop("num_examples", None)
            if not integer(1).ok(num_examples):
                raise ConfigError(f"{where}.num_examples={_show(num_examples)} is invalid: must be an integer >= 1")
            try:
                longest = max(longest, resolve(task.name, {**params, **segment})["seq_len"])
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from err
            sizes[split] += min(num_examples, task.limit_examples or num_examples)
        try:  # before any split is generated (seconds to minutes each)
            check_fits_memory(f"task.segments.{split}", "num_examples summed", sizes[split], longest)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    # A segment's value wins over task.params: a param that every segment sets is never read, and a run (or each
    # job of a multirun over it) would train on the segments' value alone.
    shadowed = [k for k in params if all(k in segment for split in SPLITS for segment in segments[split])]
    if shadowed:
        key = shadowed[0]
        raise ConfigError(f"task.params.{key}={_show(params[key])} is never read: every segment of task.segments "
                          f"sets its own {key}; set it in the segments, or remove it from them")
    every = [s for split in SPLITS for s in segments[split]]
    try:  # across the splits: a test segment from another memorization map would test what training never saw
        check_shared(task.name, every, [f"task.segments.{split}[{i}]" for split in SPLITS
                                        for i in range(len(segments[split]))], **params)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return model_shape(task.name, every, **params), sizes


def _check_model(cfg: DictConfig, shape: dict) -> None:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    # null would build the mixer with its constructor's defaults, not conf/model/'s, and record only null
    if not isinstance(model.get("mixer_options", {}), dict):
        raise ConfigError(f"model.mixer_options={_show(model['mixer_options'])} is invalid: must be a mapping of the "
                          "mixer's options, as in conf/model/ (to set one of them: model.mixer_options.KEY=VALUE)")
    given_by_task = ("self", "vocab_size", "max_seq_len")
    valid = [k for k in inspect.signature(LanguageModel.__init__).parameters if k not in given_by_task]
    unknown = sorted(set(model) - set(valid))
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a setting of the sandbox: valid keys of model: "
                          f"{', '.join(valid)}")
    try:
        with torch.device("meta"):  # the model's own checks, without its memory
            built = build_model(vocab_size=shape["vocab_size"], max_seq_len=shape["seq_len"], **model)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    # The weights are made in host memory first (on any accelerator); training on the CPU also keeps their
    # gradients and AdamW's two moments there. A model past that is a raw allocation error once the data is made.
    params = built.num_parameters()
    need = params * (16 if _runs_on_cpu(cfg.trainer.accelerator) else 4)
    memory = physical_memory()
    if memory is not None and need > memory:
        raise ConfigError(f"model: d_model={model.get('d_model')}, n_layers={model.get('n_layers')} and vocab_size="
                          f"{shape['vocab_size']} make {params:.3g} parameters, which need at least "
                          f"{need / 1e9:.3g} GB, more than this machine's {memory / 1e9:.3g} GB of memory: make the "
                          "model smaller")


def _limited(batches: int, limit: int | float) -> int:
    """Lightning's batch count under a limit_*_batches setting."""
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def _check_interval(settings: dict) -> None:
    interval = settings["trainer.val_check_interval"]
    if settings["trainer.check_val_every_n_epoch"] is None and not isinstance(interval, int):
        raise ConfigError(f"trainer.val_check_interval={interval} is invalid with "
                          "trainer.check_val_every_n_epoch=null: must be a number of steps (an integer >= 1)")


def _steps_before(batch: int, per_epoch: int, accumulate: int) -> int:
    """Optimizer steps taken before training batch `batch` (counted from 1 across epochs): Lightning steps after
    every `accumulate` batches and after an epoch's last."""
    epochs, within = divmod(batch - 1, per_epoch)
    return epochs * -(-per_epoch // accumulate) + within // accumulate


def _check_schedule(settings: dict, sizes: dict[str, int], processes: int) -> None:
    """A run must train, validate (the best checkpoint and early stopping read val/acc) and test."""
    batch_size = settings["task.batch_size"]
    eval_batch_size = settings["task.eval_batch_size"] or batch_size
    small = [split for split in SPLITS if sizes[split] < processes]
    if small:  # else a process has no batch of that split, a traceback in Lightning's fit
        raise ConfigError(f"task.segments.{small[0]} has {sizes[small[0]]} examples (under task.limit_examples), "
                          f"fewer than the {processes} processes, each of which takes its own share: give it at "
                          f"least {processes}")
    # The train loader drops a last partial batch unless the set is smaller than a batch; the global batch
    # splits evenly over processes, so the count is the same with any number of them. Each process evaluates its
    # own share of the evaluation sets, the smallest of them sizes[split] // processes.
    full = {"train": max(sizes["train"] // batch_size, 1), "val": -(-(sizes["val"] // processes) // eval_batch_size),
            "test": -(-(sizes["test"] // processes) // eval_batch_size)}
    # Lightning's overfit_batches replaces the train and validation limits
    limit_keys = {split: f"trainer.limit_{split}_batches" for split in SPLITS}
    if settings.get("trainer.overfit_batches", 0):
        limit_keys.update(train="trainer.overfit_batches", val="trainer.overfit_batches")
    batches = {}
    for split, batches_per_epoch in full.items():
        key = limit_keys[split]
        batches[split] = _limited(batches_per_epoch, settings[key])
        if batches[split] == 0:
            of_each = f" of each of the {processes} processes" if processes > 1 else ""
            raise ConfigError(f"{key}={settings[key]} leaves none of the {batches_per_epoch} {split} batches{of_each} "
                              f"({settings[key]} * {batches_per_epoch} < 1): use a fraction >= 1/{batches_per_epoch} "
                              "or a number of batches (an integer >= 1)")
    per_epoch = batches["train"]
    interval, every_n_epochs = settings["trainer.val_check_interval"], settings["trainer.check_val_every_n_epoch"]
    if every_n_epochs is None:  # an integer (_check_interval)
        first_validation = interval
    else:
        if isinstance(interval, int) and interval > per_epoch:
            overfit = (f" (trainer.overfit_batches={settings['trainer.overfit_batches']})"
                       if limit_keys["train"] == "trainer.overfit_batches" else "")
            raise ConfigError(f"trainer.val_check_interval={interval} is more than the {per_epoch} training batches "
                              f"of an epoch{overfit}: use at most {per_epoch}, a fraction of an epoch in (0, 1], or "
                              "trainer.check_val_every_n_epoch=null to count steps across epochs")
        within_epoch = interval if isinstance(interval, int) else max(1, int(per_epoch * interval))
        first_validation = (every_n_epochs - 1) * per_epoch + within_epoch
    # Validation counts training batches, max_steps optimizer steps: with gradient accumulation they differ.
    accumulate = settings.get("trainer.accumulate_grad_batches", 1)
    validation_step = _steps_before(first_validation, per_epoch, accumulate) + 1
    max_epochs, max_steps = settings["trainer.max_epochs"], settings["trainer.max_steps"]
    if max_steps != -1 and max_steps < validation_step:
        raise ConfigError(f"trainer.max_steps={max_steps} ends training before its first validation (at step "
                          f"{validation_step}): must be >= {validation_step}, or validate sooner "
                          "(trainer.val_check_interval)")
    if max_epochs * per_epoch < first_validation:
        epoch = -(-first_validation // per_epoch)
        raise ConfigError(f"trainer.max_epochs={max_epochs} ends training before its first validation (in epoch "
                          f"{epoch}, at step {validation_step}): must be >= {epoch}, or validate sooner "
                          "(trainer.check_val_every_n_epoch, trainer.val_check_interval)")
    # Lightning stops at the max lengths whatever the min ones: a min beyond them would be dropped without a word.
    steps_per_epoch = -(-per_epoch // accumulate)
    most_steps = max_epochs * steps_per_epoch if max_steps == -1 else min(max_steps, max_epochs * steps_per_epoch)
    min_steps, min_epochs = settings.get("trainer.min_steps") or 0, settings.get("trainer.min_epochs") or 0
    for key, least, steps in (("trainer.min_steps", min_steps, min_steps),
                              ("trainer.min_epochs", min_epochs, min_epochs * steps_per_epoch)):
        if steps > most_steps:
            raise ConfigError(f"{key}={least} is never met: the run stops after at most {most_steps} steps "
                              f"({steps_per_epoch} an epoch; trainer.max_steps={max_steps}, trainer.max_epochs="
                              f"{max_epochs}): lower it, or raise those")
