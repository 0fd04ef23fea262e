"""``--model.sparsity`` is a group of ``SelfishSparsityCallback``'s arguments: a mistake in it ends in one short
``error:`` line that names the argument, what was given and what is allowed (lightning_selfish_recipes/console.py).

jsonargparse reports every such mistake as a failed ``Union[SparsityArguments, None]`` (about 400 characters), and
the old flat form ``--model.sparsity 0.5`` as "Expected a path but 0.5 either not accessible or invalid".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_selfish_recipes import console
from lightning_selfish_recipes.cli import CONFIG_DIR, main

QUICKSTART = str(CONFIG_DIR / "quickstart.yaml")
HELP = "--model.sparsity.help lists the arguments"


def error_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr for ``selfish-rnn fit --config quickstart.yaml <args>``: one ``error:`` line, status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--model.sparsity", "0.5"],
            "error: --model.sparsity is a group of SelfishSparsityCallback's arguments, not one value (got 0.5): "
            "--model.sparsity.sparsity 0.5 sets the sparsity, --model.sparsity.help lists the others, "
            "--model.sparsity null trains dense",
        ),
        (
            ["--model.sparsity", "dense"],
            "error: --model.sparsity is a group of SelfishSparsityCallback's arguments, not one value (got 'dense'): "
            "--model.sparsity.sparsity <sparsity> sets the sparsity, --model.sparsity.help lists the others, "
            "--model.sparsity null trains dense",
        ),
        (
            ["--model.sparsity.sparsty", "0.5"],
            "error: --model.sparsity.sparsty is not an argument of SelfishSparsityCallback "
            f"(did you mean --model.sparsity.sparsity? {HELP})",
        ),
        (
            ["--model.sparsity.sparsity", "abc"],
            f"error: --model.sparsity.sparsity: expected a number, got 'abc' ({HELP})",
        ),
        (
            ["--model.sparsity.seed", "x"],
            f"error: --model.sparsity.seed: expected a whole number or null, got 'x' ({HELP})",
        ),
        (
            ["--model.sparsity.verbose", "maybe"],
            f"error: --model.sparsity.verbose: expected true or false, got 'maybe' ({HELP})",
        ),
        (
            ["--model.sparsity.gate_redistribution", "[1]"],
            "error: --model.sparsity.gate_redistribution: expected true or false, a string, GateRedistribution or "
            f"null, got [1] ({HELP})",
        ),
        (
            ["--model.sparsity.include", "3"],
            f"error: --model.sparsity.include: expected a list of strings or null, got 3 ({HELP})",
        ),
    ],
    ids=["flat value", "flat word", "misspelt", "float", "int or null", "bool", "union of three", "list"],
)
def test_a_mistake_in_the_sparsity_group_is_one_short_line(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert error_line(args, capsys) == expected


def test_a_sparsity_of_zero_names_the_dense_run(capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep's dense point written as sparsity 0 (it trained neither dense nor sparse: issue 25.2)."""
    line = error_line(["--model.sparsity.sparsity", "0"], capsys)
    assert line.startswith(
        "error: --model.sparsity.sparsity must be in (0, 1), got 0.0: a dense run has no sparsity callback"
    )
    assert "--model.sparsity null" in line and "sparsity: null" in line


def test_the_same_mistakes_in_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("model:\n  sparsity: 0.5\n")
    assert error_line(["--config", str(flat)], capsys).startswith(
        "error: --model.sparsity is a group of SelfishSparsityCallback's arguments, not one value (got 0.5): "
    )
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("model:\n  sparsity:\n    prune_rte: 0.5\n")
    assert error_line(["--config", str(misspelt)], capsys) == (
        "error: --model.sparsity.prune_rte is not an argument of SelfishSparsityCallback "
        f"(did you mean --model.sparsity.prune_rate? {HELP})"
    )


def test_other_parsing_errors_keep_their_message() -> None:
    """Only the group's own mistakes are rewritten; a message of another shape goes through as before."""
    import argparse

    other = argparse.ArgumentError(None, 'Parser key "model.optimizer":\n  Expected one of ...\n  Got value: foo')
    assert console.user_error_message(other, ["fit"]) == (
        "--model.optimizer: Expected one of ... Got value: foo (selfish-rnn fit --help lists the arguments)"
    )
