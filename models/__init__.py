"""The model zoo: a language-model backbone (`build_model`) around one of the sequence mixers in `MIXERS`."""

from models.backbone import MIXERS, LanguageModel, ModelOutput, build_model, mixer_option_defaults

__all__ = ["MIXERS", "LanguageModel", "ModelOutput", "build_model", "mixer_option_defaults"]
