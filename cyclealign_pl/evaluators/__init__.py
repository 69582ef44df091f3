"""Evaluators independent of the judge and of the white box's training signal (docs/real_models.md)."""

from cyclealign_pl.evaluators.reward import DEFAULT_HEAD, HumanPreferenceRewardModel

__all__ = ["DEFAULT_HEAD", "HumanPreferenceRewardModel"]
