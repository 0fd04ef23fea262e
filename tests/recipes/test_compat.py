"""lightning_selfish_recipes/compat.py: each private attribute of another library the recipes read, on the real
library. A test here fails when the library changes the attribute (renamed, moved, other meaning): fix the one
function, nothing else."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_selfish_recipes import compat
from lightning_selfish_recipes.compat import pl


class Tiny(pl.LightningModule):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(width, 1)
        self.seen: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(compat.logs_this_step(self.trainer))
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_logs_this_step_is_lightnings_log_every_n_steps_rule(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=1)
    model = Tiny()
    trainer = pl.Trainer(
        max_steps=8, log_every_n_steps=3, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, loader)
    assert model.seen == [(step + 1) % 3 == 0 for step in range(8)]


def test_given_hyperparameters_are_the_clis_arguments() -> None:
    assert compat.given_hyperparameters() is None  # outside LightningCLI
    variable = compat.module("core.mixins.hparams_mixin")._given_hyperparameters
    token = variable.set({"network": {"class_path": "x"}})
    try:
        assert compat.given_hyperparameters() == {"network": {"class_path": "x"}}
    finally:
        variable.reset(token)


def test_tensorboard_hparams_and_file_writer(tmp_path: Path) -> None:
    logger = compat.module("loggers").TensorBoardLogger(tmp_path)
    flat = compat.tensorboard_hparams(logger, {"lr": 1.0, "sparsity": {"method": "rigl"}, "steps": None})
    assert flat == {"lr": 1.0, "sparsity/method": "rigl", "steps": "None"}
    writer = compat.tensorboard_file_writer(logger)
    assert callable(writer.add_summary) and writer.get_logdir() == logger.log_dir


def test_argument_groups_in_help_order() -> None:
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("late")
    group.add_argument("--late")
    groups = compat.argument_groups(parser)
    assert groups[-1] is group and [a.dest for a in compat.group_actions(group)] == ["late"]
    compat.set_argument_groups(parser, [group, *groups[:-1]])
    assert parser.format_help().index("late:") < parser.format_help().index("options:")


@pytest.mark.parametrize("name", ["argument_groups", "group_actions", "set_argument_groups"])
def test_the_cli_parser_is_argparse(name: str) -> None:
    """LightningArgumentParser (jsonargparse) is an argparse parser: the argparse functions apply to it."""
    assert issubclass(compat.module("cli").LightningArgumentParser, argparse.ArgumentParser)
    assert callable(getattr(compat, name))


def test_help_formatter_rewrites_the_help_of_arguments_and_the_other_texts() -> None:
    """argparse passes each argument's help through ``_expand_help`` and descriptions through ``_format_text``."""
    formatter = compat.help_formatter(
        argparse.HelpFormatter, help_text=lambda text: text.upper(), other_text=lambda text: text.replace("x", "Y"),
        name="Shouting",
    )  # fmt: skip
    parser = argparse.ArgumentParser(description="parser x", formatter_class=formatter)
    group = parser.add_argument_group("grouped", description="group x")
    group.add_argument("--width", help="the width (default %(default)s)", default=3)
    shown = parser.format_help()
    assert "parser Y" in shown and "group Y" in shown and "THE WIDTH (DEFAULT 3)" in shown
    assert "parser x" not in shown and "the width" not in shown


class _Parsed(Exception):
    """Stops a LightningCLI right after its parsers are set up."""


def test_subcommand_parsers_are_the_parsers_lightningcli_set_up() -> None:
    LightningCLI = compat.module("cli").LightningCLI

    class Probe(LightningCLI):
        def parse_arguments(self, parser, args):  # called right after setup_parser
            raise _Parsed(compat.subcommand_parsers(self))

    BoringModel = compat.module("demos.boring_classes").BoringModel
    with pytest.raises(_Parsed) as parsed:
        Probe(BoringModel, args=["fit"])
    parsers = parsed.value.args[0]
    assert list(parsers) == list(LightningCLI.subcommands())
    assert all(isinstance(p, compat.module("cli").LightningArgumentParser) for p in parsers.values())
    assert "--ckpt_path" in parsers["fit"].format_help() and "--trainer.max_epochs" in parsers["test"].format_help()


def test_forget_rnn_weights_drops_the_cached_tensors_of_the_named_weights_only() -> None:
    lstm = nn.LSTM(3, 4)
    kept = lstm.weight_ih_l0
    compat.forget_rnn_weights(lstm, ["weight_hh_l0"])
    index = lstm._flat_weights_names.index("weight_hh_l0")
    assert lstm._flat_weights[index] is None and lstm._flat_weight_refs[index] is None
    assert lstm._flat_weights[0] is kept and lstm._flat_weight_refs[0]() is kept
    # what it is for: a weight swapped in for one call is not kept, and is not taken for a changed weight after
    weight = nn.Parameter(torch.randn(16, 4))
    delattr(lstm, "weight_hh_l0")
    out, _ = torch.func.functional_call(lstm, {"weight_hh_l0": weight * 1.0}, (torch.randn(2, 1, 3),))
    assert lstm._flat_weights[index] is not None  # torch left the call's tensor behind
    compat.forget_rnn_weights(lstm, ["weight_hh_l0"])
    assert lstm._flat_weights[index] is None and not lstm._weights_have_changed()
