"""Memory options: LoRA adapters through peft (only adapters train; exports are plain models) and gradient
checkpointing (trains the same, without the shared-prefix cache)."""

from __future__ import annotations

import pytest
import torch

from cyclealign_pl.cycle import CycleConfig
from cyclealign_pl.hf import ModelLoadError, plain_model
from cyclealign_pl.settings import WhiteBoxConfig
from tests.helpers import QUESTIONS, WhiteBoxMirrorJudge, make_data, make_trainer, swap_top_two, tiny_module

pytest.importorskip("peft", reason="LoRA needs the 'lora' extra (peft)")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def lora_module(gradient_checkpointing: bool = False, **kwargs):
    judge = WhiteBoxMirrorJudge(swap_top_two)
    return tiny_module(
        judge,
        cycle=CycleConfig(max_iterations=2),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        whitebox=WhiteBoxConfig(max_length=128, lora=LORA, gradient_checkpointing=gradient_checkpointing),
        **kwargs,
    )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_lora_trains_only_the_adapters(checkpointing, hh_root, tmp_path):
    module = lora_module(gradient_checkpointing=checkpointing)
    trainable = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert sum(p.numel() for p in module.model.parameters() if p.requires_grad) < 0.1 * sum(
        p.numel() for p in module.model.parameters()
    )
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}

    trainer = make_trainer(tmp_path, batches=2)
    trainer.fit(module, make_data(hh_root(QUESTIONS[:8])))

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.model.parameters() if p.requires_grad}
    assert module.counters.optimizer_steps >= 2
    changed = {name for name, p in module.model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and changed <= trainable  # the frozen base never moves


def test_lora_export_merges_adapters_into_a_plain_transformers_model(hh_root, tmp_path):
    from transformers import AutoModelForCausalLM

    from cyclealign_pl.callbacks import ExportPretrained
    from cyclealign_pl.export import export_checkpoint

    module = lora_module()
    export = ExportPretrained(dirpath=str(tmp_path / "hf"))
    trainer = make_trainer(tmp_path, batches=1, callbacks=[export])
    trainer.fit(module, make_data(hh_root(QUESTIONS[:8])))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    assert any("lora_" in name for name, _ in module.model.named_parameters()), (
        "the module keeps its adapters"
    )

    ids = torch.tensor([[5, 17, 99, 42, 7, 1]])
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
    for path in (tmp_path / "hf", export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "from_ckpt")):
        plain = AutoModelForCausalLM.from_pretrained(path).eval()
        assert not any("lora" in name for name in plain.state_dict()), path
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_plain_model_is_the_model_itself_without_adapters():
    module = tiny_module(None)
    assert plain_model(module.model) is module.model


def test_bad_lora_settings_name_the_field():
    with pytest.raises(ModelLoadError, match="model.whitebox.lora"):
        tiny_module(None, whitebox=WhiteBoxConfig(max_length=128, lora={"rank": 4}))


@pytest.mark.slow
def test_lora_preset_fits_through_the_cli(tmp_path):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from cyclealign_pl.cli import main
    from tests.helpers import cli_args

    lora = str(Path(__file__).resolve().parents[1] / "configs" / "lora.yaml")
    cli = main(
        [
            "fit",
            *cli_args(
                tmp_path,
                "--config",
                lora,
                "--trainer.limit_train_batches",
                "1",
                "--trainer.limit_val_batches",
                "0",
                "--model.cycle.max_iterations",
                "2",
            ),
        ]
    )
    module = cli.model
    assert module.counters.steps == 1 and module.counters.optimizer_steps >= 1
    assert all("lora_" in name for name, p in module.model.named_parameters() if p.requires_grad)
    exported = AutoModelForCausalLM.from_pretrained(Path(cli.trainer.log_dir) / "hf_model")
    assert not any("lora" in name for name in exported.state_dict())
