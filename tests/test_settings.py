"""Every setting a user can type is checked before any work (sandbox/settings.py): a nonsense value gets one
line on stderr naming the setting and what is valid, exit code 2, no traceback, and nothing on disk changes.
The cases are the settings rows of docs/bad_inputs.md; each runs against the output root of test_faults.py
that holds a finished run and a finished study."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_faults import FAST, assert_one_line_naming, finished_root, snapshot, train_cli  # noqa: F401

from sandbox.data import RecallDataModule
from sandbox.settings import ConfigError, check_settings, uses_cuda_graphs
from sandbox.train import CONF_DIR, train
from tasks.splits import SEEDS_PER_SPLIT

LARGEST_SEED = str(SEEDS_PER_SPLIT - 1)

# case id -> (overrides, strings the one line must hold: the setting, and where it helps what is valid)
BAD_SETTINGS = {
    # of the wrong type
    "lr-not-a-number": (["optim.lr=abc"], ["optim.lr"]),
    "batch-size-a-word": (["task.batch_size=two"], ["task.batch_size"]),
    "batch-size-a-fraction": (["task.batch_size=1.5"], ["task.batch_size", "integer"]),
    "max-epochs-a-fraction": (["trainer.max_epochs=1.5"], ["trainer.max_epochs", "integer"]),
    "seed-a-word": (["seed=abc"], ["seed", LARGEST_SEED]),
    "betas-a-word": (["optim.betas=abc"], ["optim.betas"]),
    "devices-a-word": (["trainer.devices=abc"], ["trainer.devices"]),
    "limit-examples-a-fraction": (["task.limit_examples=1.5"], ["task.limit_examples"]),
    "segment-size-a-word": (["task.segments.train=[{seq_len: 16, num_kv_pairs: 2, num_examples: abc}]"],
                            ["task.segments.train[0].num_examples"]),
    "model-width-a-word": (["model.d_model=abc"], ["d_model"]),
    # out of range, or not finite
    "seed-negative": (["seed=-1"], ["seed", LARGEST_SEED]),
    "seed-too-large": ([f"seed={SEEDS_PER_SPLIT}"], ["seed", LARGEST_SEED]),
    # a suite sandbox-report does not read: its runs left out of the MAD section without a word
    "suite-misspelt": (["suite=MAD"], ["suite=MAD", "null", "mad"]),
    "lr-inf": (["optim.lr=inf"], ["optim.lr", "finite"]),
    "lr-nan": (["optim.lr=nan"], ["optim.lr", "finite"]),
    "weight-decay-inf": (["optim.weight_decay=inf"], ["optim.weight_decay", "finite"]),
    "aux-loss-coef-nan": (["model.mixer_options.aux_loss_coef=nan"], ["aux_loss_coef", "finite"]),
    "expand-v-inf": (["model.mixer_options.expand_v=inf"], ["expand_v", "finite"]),
    "min-lr-ratio-negative": (["optim.min_lr_ratio=-5"], ["optim.min_lr_ratio", "[0, 1]"]),
    "min-lr-ratio-above-one": (["optim.min_lr_ratio=1.5"], ["optim.min_lr_ratio", "[0, 1]"]),
    "warmup-ratio-one": (["optim.warmup_ratio=1"], ["optim.warmup_ratio"]),
    "betas-out-of-range": (["optim.betas=[0.9,1.5]"], ["optim.betas"]),
    "gradient-clip-negative": (["trainer.gradient_clip_val=-1"], ["trainer.gradient_clip_val"]),
    "eval-batch-zero": (["task.eval_batch_size=0"], ["task.eval_batch_size"]),
    "limit-train-zero": (["trainer.limit_train_batches=0"], ["trainer.limit_train_batches"]),
    "limit-val-zero": (["trainer.limit_val_batches=0"], ["trainer.limit_val_batches"]),
    "limit-test-zero": (["trainer.limit_test_batches=0"], ["trainer.limit_test_batches"]),
    "val-interval-zero": (["trainer.val_check_interval=0"], ["trainer.val_check_interval"]),
    "val-interval-above-one": (["trainer.val_check_interval=1.5"], ["trainer.val_check_interval"]),
    "log-every-zero": (["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps"]),
    "sanity-steps-below-minus-one": (["trainer.num_sanity_val_steps=-2"], ["trainer.num_sanity_val_steps"]),
    "devices-zero": (["trainer.devices=0"], ["trainer.devices"]),
    "patience-negative": (["callbacks.early_stopping.patience=-1"], ["callbacks.early_stopping.patience"]),
    "threshold-zero": (["callbacks.early_stopping.threshold=0"], ["callbacks.early_stopping.threshold"]),
    # meaningless with the other settings, or on this machine
    "max-steps-before-first-validation": (["trainer.max_steps=1"], ["trainer.max_steps", "validation"]),
    "max-steps-below-step-interval": (["trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=50",
                                       "trainer.max_steps=10"], ["trainer.max_steps", "validation"]),
    "max-epochs-before-first-validation": (["trainer.check_val_every_n_epoch=2"], ["trainer.max_epochs"]),
    "val-interval-above-epoch": (["trainer.val_check_interval=50"], ["trainer.val_check_interval"]),
    "fraction-interval-counting-steps": (["trainer.check_val_every_n_epoch=null"], ["trainer.val_check_interval"]),
    "limit-train-rounds-to-zero": (["trainer.limit_train_batches=0.01"], ["trainer.limit_train_batches"]),
    "precision-16-mixed-on-cpu": (["trainer.accelerator=cpu", "trainer.precision=16-mixed"],
                                  ["trainer.precision", "bf16-mixed"]),
    "device-list-on-cpu": (["trainer.accelerator=cpu", "trainer.devices=[0]"], ["trainer.devices", "CPU"]),
    "every-device-on-cpu": (["trainer.accelerator=cpu", "trainer.devices=-1"], ["trainer.devices", "CPU"]),
    "unknown-strategy": (["trainer.strategy=foo"], ["trainer.strategy"]),
    "strategy-spawn": (["trainer.devices=2", "trainer.strategy=ddp_spawn", "task.batch_size=16"],
                       ["trainer.strategy=ddp_spawn", "auto or ddp"]),
    "strategy-fork": (["trainer.strategy=ddp_fork"], ["trainer.strategy=ddp_fork", "auto or ddp"]),
    "precision-16-true-on-cpu": (["trainer.accelerator=cpu", "trainer.precision=16-true"],
                                 ["trainer.precision=16-true", "32-true"]),
    "num-nodes-two": (["+trainer.num_nodes=2", "trainer.accelerator=cpu"], ["trainer.num_nodes=2", "1"]),
    "accumulate-grad-zero": (["+trainer.accumulate_grad_batches=0"], ["trainer.accumulate_grad_batches", ">= 1"]),
    "min-epochs-negative": (["+trainer.min_epochs=-3"], ["trainer.min_epochs=-3", ">= 0"]),
    "fast-dev-run": (["+trainer.fast_dev_run=true"], ["trainer.fast_dev_run", "debug=fast"]),
    "unknown-split": (["+task.segments.tset=[{seq_len: 16, num_kv_pairs: 2, num_examples: 8}]"],
                      ["task.segments.tset", "train, val, test"]),
    # a section or a config group set to null
    "segments-null": (["task.segments=null"], ["task.segments=null", "mapping"]),
    "params-null": (["task.params=null"], ["task.params=null", "mapping"]),
    "optim-null": (["optim=null"], ["optim=null", "mapping"]),
    "model-null": (["model=null"], ["model=null", "attention"]),
    "trainer-null": (["trainer=null"], ["trainer=null", "ddp, default"]),
    "unknown-accelerator": (["trainer.accelerator=foo"], ["trainer.accelerator"]),
    # keys that would do nothing, or are gone
    "unknown-optim-key": (["+optim.foo=1"], ["optim.foo", "lr"]),
    "unknown-top-level-key": (["+foo=1"], ["foo", "seed"]),
    "unknown-trainer-key": (["+trainer.foo=1"], ["trainer.foo"]),
    "unknown-model-key": (["+model.foo=1"], ["model.foo", "d_model"]),
    # null trained the mixer at its constructor's defaults (MoM's aux_loss_coef 1e-3, not 0.01), recorded as null
    "mixer-options-null": (["model.mixer_options=null"], ["model.mixer_options=null", "mapping"]),
    "missing-key": (["~optim.lr"], ["optim.lr"]),
    "cuda-graphs-a-word": (["cuda_graphs=yes"], ["cuda_graphs=yes", "auto, true or false"]),
    # an accelerator this machine lacks: a traceback in Lightning (tpu), after the data was generated
    "accelerator-tpu-not-here": (["trainer.accelerator=tpu"], ["trainer.accelerator=tpu", "auto or cpu"]),
    # float64 on the Triton kernels (auto's on CUDA; triton under the tests' interpreter): a traceback at step 1
    "precision-64-on-triton": (["model=gated_deltanet", "model.backend=triton", "trainer.precision=64-true"],
                               ["trainer.precision=64-true", "model.backend=torch"]),
    "precision-64-on-triton-bf16": (["model=mom", "model.backend=triton_bf16", "trainer.precision=64-true"],
                                    ["trainer.precision=64-true", "model.backend=torch"]),
    # a number given as a string was named as the number itself, as if that were refused
    "num-examples-a-string": (["task.segments.val=[{seq_len: 64, num_kv_pairs: 4, num_examples: '10'}]"],
                              ["task.segments.val[0].num_examples='10'"]),
    "lr-a-string": (["optim.lr='1e-3'"], ["optim.lr='1e-3'"]),
    # a split past the machine's memory: refused by the generator after the splits before it were made, unnamed
    "test-split-past-memory": (["task.segments.test=[{seq_len: 100000000, num_kv_pairs: 4, num_examples: 100}]"],
                               ["task.segments.test", "num_examples summed=", "GiB"]),
    "val-example-past-memory": (["task.segments.val=[{seq_len: 1000000000000, num_kv_pairs: 4, num_examples: 1}]"],
                                ["task.segments.val", "seq_len=1000000000000", "GiB"]),
    # a model past the machine's memory: a raw allocation error (RuntimeError) once the data was generated
    "model-past-memory": (["model.d_model=100000000"], ["d_model=100000000", "memory"]),
    # a Lightning argument of the wrong type: a traceback (AttributeError) once the data was generated
    "trainer-argument-wrong-type": (["+trainer.max_time=5"], ["trainer.max_time=5"]),
    # a least length Lightning never reaches, as it stops at the max ones first: taken without a word
    "min-steps-never-met": (["+trainer.min_steps=100", "trainer.max_steps=2"], ["trainer.min_steps=100"]),
    "min-epochs-never-met": (["+trainer.min_epochs=5"], ["trainer.min_epochs=5"]),
    # a time limit of nothing: recorded as not trained "(trainer.limit_train_batches, task.limit_examples)"
    "max-time-zero": (["+trainer.max_time=00:00:00:00"], ["trainer.max_time=00:00:00:00"]),
    # overfit_batches replaces the train and validation limits: a traceback in Lightning's fit, the data made
    "overfit-batches-below-interval": (["+trainer.overfit_batches=1", "trainer.val_check_interval=2"],
                                       ["trainer.val_check_interval=2", "trainer.overfit_batches=1"]),
    # each process evaluates its own shard: a traceback in Lightning's fit (or, for test, after training)
    "eval-split-smaller-than-processes": (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                           "task.segments.val=[{seq_len: 64, num_kv_pairs: 4, num_examples: 1}]"],
                                          ["task.segments.val", "2 processes"]),
    "eval-fraction-of-a-process-shard": (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                          "task.segments.test=[{seq_len: 64, num_kv_pairs: 4, num_examples: 32}]",
                                          "trainer.limit_test_batches=0.5"], ["trainer.limit_test_batches=0.5"]),
}
# On a machine without CUDA (as the tests make it): settings that need a GPU.
BAD_WITHOUT_CUDA = {
    "precision-16-mixed-without-cuda": (["trainer.precision=16-mixed"], ["trainer.precision", "bf16-mixed"]),
    "accelerator-gpu-without-cuda": (["trainer.accelerator=gpu"], ["trainer.accelerator", "cpu"]),
    "triton-without-cuda": (["model.backend=triton"], ["model.backend=triton", "CUDA", "auto or torch"]),
    "triton-bf16-without-cuda": (["model.backend=triton_bf16"], ["model.backend=triton_bf16", "CUDA", "auto or torch"]),
    "cuda-graphs-without-cuda": (["cuda_graphs=true"], ["cuda_graphs=true", "CUDA device", "false"]),
}
# On a machine with CUDA (faked: the settings are only checked): what CUDA graphs cannot run (sandbox/graphs.py).
BAD_WITH_CUDA_GRAPHS = {
    "cuda-graphs-two-devices": (["trainer.devices=2"], "cuda_graphs=true is invalid with trainer.devices=2"),
    "cuda-graphs-float16": (["trainer.precision=16-mixed"], "cuda_graphs=true is invalid with trainer.precision=16"),
    "cuda-graphs-accumulating": (["+trainer.accumulate_grad_batches=2"],
                                 "cuda_graphs=true is invalid with trainer.accumulate_grad_batches=2"),
}


def check_rejected(overrides, named, root, monkeypatch, capsys) -> None:
    before = snapshot(root)
    assert train_cli(monkeypatch, *FAST, *overrides, f"output_root={root}") == 2
    err = capsys.readouterr().err
    for part in named:
        assert_one_line_naming(err, part)
    assert snapshot(root) == before


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_setting_is_one_line_exit_2(case, finished_root, monkeypatch, capsys):  # noqa: F811
    check_rejected(*BAD_SETTINGS[case], finished_root, monkeypatch, capsys)


@pytest.mark.parametrize("case", BAD_WITHOUT_CUDA)
def test_gpu_setting_without_cuda_is_one_line_exit_2(case, finished_root, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' Triton interpreter (conftest.py)
    check_rejected(*BAD_WITHOUT_CUDA[case], finished_root, monkeypatch, capsys)


@pytest.mark.parametrize("case", BAD_WITH_CUDA_GRAPHS)
def test_what_cuda_graphs_cannot_run_is_refused(case, monkeypatch):
    overrides, message = BAD_WITH_CUDA_GRAPHS[case]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_settings(compose_train("debug=fast", "cuda_graphs=true"))  # one device, bf16-mixed: valid
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        check_settings(compose_train("debug=fast", "cuda_graphs=true", *overrides))


@pytest.mark.parametrize("case", [None, *BAD_WITH_CUDA_GRAPHS])
def test_cuda_graphs_auto_graphs_wherever_they_can_run(case, monkeypatch):
    """The default, auto: graphed on one CUDA device; where `true` would be refused, valid and not graphed."""
    overrides = BAD_WITH_CUDA_GRAPHS[case][0] if case else []
    cfg = compose_train("debug=fast", *overrides)
    assert cfg.cuda_graphs == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not uses_cuda_graphs(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_settings(cfg)
    assert uses_cuda_graphs(cfg) == (case is None)
    assert not uses_cuda_graphs(compose_train("debug=fast", "cuda_graphs=false"))


# The run folder's path: settings that would put it outside output_root (or output_root at the file system's root).
BAD_RUN_FOLDERS = {
    "name-escapes": (["name=../../escape"], "name=../../escape"),
    "name-empty": (["name="], "name=''"),
    "name-absolute": (["name=/abs/path"], "name=/abs/path"),
    "name-dot": (["name=."], "name=."),
    "output-root-empty": (["output_root="], "output_root=''"),
    # a folder name past the file system's 255 bytes: an OSError traceback, with output_root made
    "name-too-long": ([f"name={'a' * 256}"], "name=aaa"),
    "output-root-name-too-long": ([f"output_root=new/{'a' * 256}"], "output_root=new/aaa"),
}


@pytest.mark.parametrize("case", BAD_RUN_FOLDERS)
def test_run_folder_settings_are_checked_before_any_folder(case, tmp_path, monkeypatch, capsys):
    """Checked where Hydra resolves the run folder's path, before it makes any folder."""
    overrides, named = BAD_RUN_FOLDERS[case]
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    monkeypatch.chdir(root)
    output_root = [] if case.startswith("output-root") else [f"output_root={root}"]
    assert train_cli(monkeypatch, *FAST, *output_root, *overrides) == 2
    assert_one_line_naming(capsys.readouterr().err, named)
    assert snapshot(tmp_path) == {"a": "dir", "a/b": "dir"}
    assert not Path("/train").exists()


def test_output_root_that_is_a_file_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    file = tmp_path / "file"
    file.write_text("kept")
    assert train_cli(monkeypatch, *FAST, f"output_root={file}") == 2
    assert_one_line_naming(capsys.readouterr().err, "output_root")
    assert list(tmp_path.iterdir()) == [file] and file.read_text() == "kept"


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


SHIPPED = [f"experiment={p.stem}" for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))] + [
    f"{group}={p.stem}" for group in ("model", "task", "trainer", "logger", "debug")
    for p in sorted((CONF_DIR / group).glob("*.yaml"))]


@pytest.mark.parametrize("choice", SHIPPED)
def test_shipped_configs_pass_the_checks(choice):
    """Every key of every shipped config has a rule, and the shipped values keep to it."""
    check_settings(compose_train(choice))


@pytest.mark.parametrize("overrides", [
    [f"seed={LARGEST_SEED}"], ["seed=0"], ["optim.min_lr_ratio=1"], ["optim.warmup_ratio=0"],
    ["task.eval_batch_size=null"], ["trainer.gradient_clip_val=0"], ["trainer.gradient_clip_val=null"],
    ["trainer.precision=bf16-mixed"], ["trainer.precision=32"], ["trainer.limit_train_batches=1"],
    ["trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=2", "trainer.max_steps=2"],
    ["+trainer.accumulate_grad_batches=2"], ["model.mixer_options.expand_v=2"], ["trainer.devices=2"],
    ["model=deltanet", "model.mixer_options.allow_neg_eigval=true"], ["model.mixer_options.allow_neg_eigval=true"],
    ["+trainer.num_nodes=1"], ["+trainer.fast_dev_run=false"], ["+trainer.min_epochs=0"], ["name=2024"],
    ["name=run.1"], ["trainer.strategy=ddp"],
    # validation counts training batches, max_steps optimizer steps: batch 4 is step 2 when accumulating 2
    ["+trainer.accumulate_grad_batches=2", "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=4",
     "trainer.max_steps=2", "trainer.max_epochs=2"],
    ["+trainer.max_time={minutes: 5}"], ["+trainer.overfit_batches=1"], ["+trainer.min_steps=2", "trainer.max_steps=2"],
], ids=lambda overrides: " ".join(overrides))
def test_valid_edge_settings_pass_the_checks(overrides):
    check_settings(compose_train("debug=fast", *overrides))


# Lightning's own checks of its arguments, made by check_settings (so before any data, and by the multirun
# launcher and the sweep before any run trains) rather than when sandbox.train builds the trainer.
BAD_FOR_LIGHTNING = {
    "clip-algorithm-unknown": (["+trainer.gradient_clip_algorithm=foo"], "gradient_clip_algorithm"),
    "barebones-with-logger": (["+trainer.barebones=true"], "barebones=True"),
    "no-checkpointing": (["+trainer.enable_checkpointing=false"], "enable_checkpointing=False"),
    "profiler-unknown": (["+trainer.profiler=foo"], "profiler"),
    "batch-not-divisible": (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3"], "task.batch_size=16"),
}


@pytest.mark.parametrize("case", BAD_FOR_LIGHTNING)
def test_lightning_argument_is_checked_with_the_settings(case):
    overrides, named = BAD_FOR_LIGHTNING[case]
    with pytest.raises(ConfigError) as err:
        check_settings(compose_train("debug=fast", *overrides))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_float64_on_the_triton_kernels_is_refused_where_auto_picks_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"^trainer\.precision=64-true is invalid with model\.backend=auto"):
        check_settings(compose_train("debug=fast", "model=mom", "trainer.precision=64-true"))
    check_settings(compose_train("debug=fast", "model=mom", "trainer.precision=64-true", "model.backend=torch"))
    check_settings(compose_train("debug=fast", "model=attention", "trainer.precision=64-true"))  # torch's attention
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_settings(compose_train("debug=fast", "model=mom", "trainer.precision=64-true"))  # auto: torch on the CPU


def test_settings_are_checked_where_the_system_does_not_give_its_memory(monkeypatch):
    """Windows has no os.sysconf: the memory check stands aside there, the other checks run."""
    monkeypatch.delattr("os.sysconf", raising=False)
    check_settings(compose_train("debug=fast"))
    with pytest.raises(ConfigError, match=r"^optim\.lr=0 is invalid"):
        check_settings(compose_train("debug=fast", "optim.lr=0"))


def test_check_settings_raises_config_error_naming_the_key():
    """The sweep calls it on a trial's composed config before its first trial."""
    with pytest.raises(ConfigError, match=r"^optim\.lr=abc is invalid"):
        check_settings(compose_train("optim.lr=abc"))


def test_eval_batch_size_null_is_the_training_batch_size():
    data = RecallDataModule(name="mqar", params={}, segments={}, seed=0, batch_size=12, eval_batch_size=None)
    assert data.eval_batch_size == 12


def test_tensorboard_logger_works_on_a_fresh_install(tmp_path):
    """logger=tensorboard needs the tensorboard package, which the project installs."""
    cfg = compose_train(*FAST, "logger=tensorboard", "callbacks.progress=none", f"output_root={tmp_path}")
    train(cfg, tmp_path / "run")
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))


def test_one_line_keeps_a_config_error_raised_while_another_was_handled():
    from sandbox.train import one_line

    try:
        try:
            raise ConfigError("model: num_heads=3 does not divide d_model=64")
        except ConfigError as inner:
            raise ConfigError(f"sweep param num_heads: 3 is invalid: {inner}") from inner
    except ConfigError as outer:
        assert one_line(outer).startswith("sweep param num_heads: 3 is invalid: model:")
