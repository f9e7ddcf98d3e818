"""Stacked runs (sandbox/stacked.py) equal the same runs alone: forward, gradients, and whole training steps with
the optimizer, schedule and clipping, for every mixer family on the torch backend."""

import pytest
import torch

from models import build_model
from sandbox.module import WarmupCosine, adamw, labelled_loss
from sandbox.stacked import StackedModel, clip_per_run, stacked_adamw
from tasks import IGNORE

VOCAB, T, BATCH = 48, 24, 3
MIXERS = ["attention", "gated_deltanet", "mom", "gla", "deltanet", "linear_attention", "simple_gla"]


def make_models(mixer: str, seeds: list[int], backend: str = "torch", **settings) -> list:
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(vocab_size=VOCAB, max_seq_len=T, mixer=mixer, d_model=16, backend=backend,
                                  **settings).double())
    return models


def batches(runs: int, steps: int, seed: int = 0):
    """Per step: inputs, labels [R, B, T], each run its own batch; about a third of the positions labelled."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randint(0, VOCAB, (runs, BATCH, T), generator=g)
        labels = torch.randint(0, VOCAB, (runs, BATCH, T), generator=g)
        labels[torch.rand(runs, BATCH, T, generator=g) < 0.66] = IGNORE
        yield inputs, labels


def assert_stacked_equals_alone(models, inputs, labels, loss_tol: tuple, grad_tol: tuple) -> None:
    """One forward+backward of the models stacked and of each alone, on run r's batch inputs[r], labels[r]: losses
    and router statistics within loss_tol (rtol, atol), hits and masks equal, every parameter's gradient within
    grad_tol."""
    stacked = StackedModel(models)
    loss, aux, hits, mask, router = stacked.losses(inputs, labels, max_labels=T)
    (loss + aux).sum().backward()
    params = stacked.stacked()
    for r, model in enumerate(models):
        alone = labelled_loss(model, inputs[r], labels[r], max_labels=T)
        (alone[0] + alone[1]).backward()
        torch.testing.assert_close(loss[r], alone[0], rtol=loss_tol[0], atol=loss_tol[1])
        assert torch.equal(hits[r], alone[2]) and torch.equal(mask[r], alone[3])
        alone_router = model.router_stats(as_tensors=True)
        assert router.keys() == alone_router.keys()
        for key, value in alone_router.items():
            torch.testing.assert_close(router[key][r], value, rtol=loss_tol[0], atol=loss_tol[1])
        for name, p in model.named_parameters():
            torch.testing.assert_close(params[name].grad[r], p.grad, rtol=grad_tol[0], atol=grad_tol[1],
                                       msg=lambda m, r=r, name=name: f"run {r}: {name}: {m}")
    assert params["embed.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_stacked_forward_and_gradients_equal_each_model_alone(mixer):
    assert_stacked_equals_alone(make_models(mixer, [0, 1, 2]), *next(batches(3, 1, seed=5)),
                                loss_tol=(1e-12, 1e-12), grad_tol=(1e-10, 1e-12))


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet", "mom"])
def test_stacked_training_equals_each_run_alone(mixer):
    """Runs with their own seed, learning rate and weight decay: 6 steps of AdamW under the warm-up cosine
    schedule with clipping at 1.0 (which binds on the first steps), stacked and one at a time; after step 3 the
    stack lets run 1 go (as it does a run that has ended) and the others go on as alone."""
    optims = [{"lr": lr, "weight_decay": wd, "betas": (0.9, 0.98)}
              for lr, wd in ((3e-3, 0.1), (1e-2, 0.0), (1e-3, 0.1))]
    steps, clip, kept = 6, 1.0, torch.tensor([0, 2])
    models = make_models(mixer, [0, 1, 2])
    stacked = StackedModel(make_models(mixer, [0, 1, 2]))
    optimizer = stacked_adamw(stacked, optims)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(2, steps, 0.0))
    params = stacked.stacked()
    for step, (inputs, labels) in enumerate(batches(3, steps)):
        if step == 3:
            optimizer.keep_runs(kept, stacked.replace({name: p[kept] for name, p in stacked.named_parameters()}))
            params = stacked.stacked()
        if step >= 3:
            inputs, labels = inputs[kept], labels[kept]
        loss, aux, *_ = stacked.losses(inputs, labels, max_labels=T)
        (loss + aux).sum().backward()
        clip_per_run(list(params.values()), clip)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    assert params["embed.weight"].shape[0] == 2
    for position, r in enumerate(kept.tolist()):
        model = models[r]
        alone = adamw(model, optims[r], fused=False)
        alone_schedule = torch.optim.lr_scheduler.LambdaLR(alone, WarmupCosine(2, steps, 0.0))
        for inputs, labels in batches(3, steps):
            loss, aux, *_ = labelled_loss(model, inputs[r], labels[r], max_labels=T)
            (loss + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            alone.step()
            alone.zero_grad()
            alone_schedule.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(params[name][position], p, rtol=1e-9, atol=1e-11,
                                       msg=lambda m, r=r, name=name: f"run {r}: {name}: {m}")
    start = make_models(mixer, [0])[0]
    assert not torch.allclose(start.embed.weight, models[0].embed.weight)  # the runs moved


def test_runs_of_other_configurations_or_optimizer_settings_are_refused():
    with pytest.raises(ValueError, match="share one configuration"):
        StackedModel(make_models("mom", [0]) + make_models("mom", [1], n_layers=1))
    stacked = StackedModel(make_models("attention", [0, 1]))
    with pytest.raises(ValueError, match=r"optim\.betas differs"):
        stacked_adamw(stacked, [{"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.98)},
                                {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}])


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mom"])
def test_stacked_runs_on_the_triton_kernels_equal_each_model_alone(mixer):
    """The chunked Triton op folds the runs into its batch (kernels/runs.py; the interpreter on the CPU); each
    model alone takes its own Triton path (MoM: the packed one)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = [m.float().to(device) for m in make_models(mixer, [0, 1], backend="triton")]
    inputs, labels = (x.to(device) for x in next(batches(2, 1, seed=7)))
    assert_stacked_equals_alone(models, inputs, labels, loss_tol=(1e-4, 1e-5), grad_tol=(1e-3, 1e-5))
