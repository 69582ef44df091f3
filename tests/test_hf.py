"""Loading models and tokenizers (cyclealign_pl.hf): clear errors for settings that contradict each other."""

from __future__ import annotations

import pytest


def test_hf_refuses_a_path_and_a_config_together():
    from cyclealign_pl.hf import ModelLoadError, load_causal_lm, load_reward_model

    with pytest.raises(
        ModelLoadError, match=r"model\.model='some/path' and model\.model_config are both set"
    ):
        load_causal_lm("some/path", {"model_type": "llama"})
    with pytest.raises(ModelLoadError, match="model='some/rm' and config are both set"):
        load_reward_model("some/rm", {"model_type": "llama"})
