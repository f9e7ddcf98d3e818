"""CUDA graphs (`cuda_graphs`, sandbox/graphs.py): a run whose training loss replays CUDA graphs trains as the same
run launched op by op. CUDA only; the settings it refuses are in tests/test_settings.py."""

import pytest
import torch
from test_train import make_cfg, metrics_rows

from sandbox.train import train

# 40 steps, every one logged: the training loss of each step of the two runs side by side
SHORT = ["experiment=quickstart", "task.limit_examples=640", "task.batch_size=32", "trainer.max_steps=40",
         "trainer.val_check_interval=20", "trainer.log_every_n_steps=1", "callbacks.early_stopping.threshold=1.0",
         "model.backend=triton"]


def train_losses(run_dir) -> list[float]:
    return [float(row["train/loss"]) for row in metrics_rows(run_dir) if row.get("train/loss")]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("model", ["attention", "gated_deltanet", "mom"])
def test_graphed_run_trains_as_the_same_run_launched_op_by_op(model, precision, tmp_path):
    overrides = [*SHORT, f"model={model}", f"trainer.precision={precision}"]
    eager = train(make_cfg(*overrides, "cuda_graphs=false"), tmp_path / "eager")
    graphed = train(make_cfg(*overrides), tmp_path / "graphed")  # auto, the default: graphed on one GPU
    assert not eager["cuda_graphs"] and graphed["cuda_graphs"]
    assert eager["status"] == graphed["status"] == "finished" and eager["steps"] == graphed["steps"] == 40
    losses, graphed_losses = train_losses(tmp_path / "eager"), train_losses(tmp_path / "graphed")
    assert len(losses) == len(graphed_losses) == 40
    # each step saw its own batch (a graph replaying its captured batch would give another curve), and the same
    # kernels gave the same losses up to the order of floating-point sums
    assert len(set(graphed_losses)) > 30
    tolerance = 1e-4 if precision == "32-true" else 2e-2
    differences = [abs(a - b) / abs(a) for a, b in zip(losses, graphed_losses)]
    assert max(differences) < tolerance, differences
    assert abs(eager["best_val_acc"] - graphed["best_val_acc"]) < 0.02


@pytest.mark.gpu
def test_graphed_forward_is_used_in_training_only(tmp_path):
    """Evaluation batches (other shapes, eval mode) run op by op; the graphs are captured once per training shape."""
    from sandbox.module import RecallModule

    captured = []
    real = RecallModule.training_outputs

    def counting(self, inputs, labels):
        out = real(self, inputs, labels)
        captured.append(len(self._graphed))
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RecallModule, "training_outputs", counting)
        result = train(make_cfg(*SHORT, "model=gated_deltanet", "cuda_graphs=true"), tmp_path / "run")
    assert result["status"] == "finished" and torch.cuda.is_available()
    assert captured == [1] * 40
