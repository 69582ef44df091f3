"""Prompt data for CycleAlign: HH-RLHF (training and per-subset evaluation), BeaverTails (evaluation) and
users' own prompts (files or hub datasets)."""

from cyclealign_pl.data.base import PromptDataModuleBase, select_prompts
from cyclealign_pl.data.beavertails import BeaverTailsDataModule, load_beavertails
from cyclealign_pl.data.hh_rlhf import (
    DROP_REASONS,
    SAMPLE_ROOT,
    SUBSETS,
    HHRLHFDataModule,
    clean_pair,
    load_hh_rlhf,
    parse_dialogue,
)
from cyclealign_pl.data.prompts import PromptDataModule
from cyclealign_pl.data.rows import BATCH_KEYS, CleaningStats, DataFileError, PromptRow, Turn, render_prompt

__all__ = [
    "BATCH_KEYS",
    "DROP_REASONS",
    "SAMPLE_ROOT",
    "SUBSETS",
    "BeaverTailsDataModule",
    "CleaningStats",
    "DataFileError",
    "HHRLHFDataModule",
    "PromptDataModule",
    "PromptDataModuleBase",
    "PromptRow",
    "Turn",
    "clean_pair",
    "load_beavertails",
    "load_hh_rlhf",
    "parse_dialogue",
    "render_prompt",
    "select_prompts",
]
