"""The model configs: every preset composes, builds, and lists exactly its mixer's options (so that any
`model.mixer_options.<key>=value` the mixer takes works without `+`)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from models import build_model
from models.backbone import mixer_option_defaults

CONF = Path(__file__).resolve().parent.parent / "conf"
MODEL_PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def model_config(preset: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=[f"model={preset}"]).model, resolve=True)


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_model_preset_lists_every_option_and_builds(preset):
    config = model_config(preset)
    assert set(config["mixer_options"]) == set(mixer_option_defaults(config["mixer"]))
    model = build_model(vocab_size=64, max_seq_len=16, **config)
    assert model.config["init_std"] == 0.02 and model.config["tie_embeddings"]


def test_equal_state_control_matches_mom_state():
    mom = build_model(vocab_size=64, max_seq_len=16, **model_config("mom"))
    control = build_model(vocab_size=64, max_seq_len=16, **model_config("gated_deltanet_equal_state"))
    assert control.state_size(16) == mom.state_size(16)


def test_mad_state_tracking_comparison_is_the_command_its_comment_gives():
    """experiment=mad's sweep runs every rule positive-only (its comment once said the delta rules there were the
    ones that track state); the comparison with negative eigenvalues is the second command the comment gives."""
    comment = (CONF / "experiment" / "mad.yaml").read_text()
    command = ("sandbox-train -m experiment=mad task=parity,modular_sum,s5 model=deltanet,gated_deltanet,mom \\\n"
               "#     model.mixer_options.allow_neg_eigval=true")
    assert command in comment
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for model in ("deltanet", "gated_deltanet", "mom"):
            swept = compose("train", overrides=["experiment=mad", "task=parity", f"model={model}"])
            assert swept.model.mixer_options.allow_neg_eigval is False
            second = compose("train", overrides=["experiment=mad", "task=parity", f"model={model}",
                                                 "model.mixer_options.allow_neg_eigval=true"])
            config = OmegaConf.to_container(second.model, resolve=True)
            build_model(vocab_size=second.task.params.vocab_size, max_seq_len=16, **config)
