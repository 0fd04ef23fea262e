"""The model summary of ``selfish-rnn fit``: Lightning's table with this project's FLOPs per token.

Lightning's summary counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` while it runs the module's
``example_input_array`` through the model. The recipes' model has none, so every row and the total read 0; and with
one, the counter would still miss the recurrent layers (``nn.LSTM``/``nn.GRU`` run as one fused kernel it does not
count: only the decoder would be) and count the masked weights as if they were dense. This summary shows instead the
forward FLOPs per token of :mod:`lightning_selfish.flops` (docs/flops.md), counted on the layer shapes and on the
masks of the run, per module and in total, next to the dense figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_selfish.analysis.flops import WeightCost, collect_weight_costs, inference_flops_per_token
from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish_recipes.compat import module

_model_summary = module("utilities.model_summary")
ModelSummary = module("callbacks").ModelSummary
rank_zero_info = module("utilities.rank_zero").rank_zero_info

__all__ = ["FlopsPerTokenModelSummary", "flops_per_token_by_layer", "format_summary", "summary_text"]


class FlopsPerTokenModelSummary(ModelSummary):
    """Lightning's ``ModelSummary`` with the forward FLOPs per token of the run's masks instead of torch's count.

    It prints when training starts, after the :class:`~lightning_selfish.SelfishSparsityCallback` has made (or
    restored) its masks: Lightning's own summary prints at the start of the fit, before they exist. Without a
    sparsity callback the model is dense and both figures are the same.

    Args:
        max_depth: as Lightning's: the depth of the modules listed (``1``: the model's children; ``0``: no summary).
    """

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)
        self.max_depth = max_depth

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Nothing yet: the masks are made in the sparsity callback's ``on_fit_start``."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.max_depth and trainer.is_global_zero:
            rank_zero_info("\n" + summary_text(pl_module, trainer.callbacks, self.max_depth))


def summary_text(pl_module: Any, callbacks: Sequence[Any], max_depth: int = 1) -> str:
    """The summary of ``pl_module`` with the masks of the ``SelfishSparsityCallback`` among ``callbacks`` (dense
    without one); without FLOPs, and a line that says why, when a weight's cost is unknown."""
    summary = _model_summary.summarize(pl_module, max_depth=max_depth)
    sparsity = next((cb for cb in callbacks if isinstance(cb, SelfishSparsityCallback)), None)
    active = sparsity.engine.active_counts() if sparsity is not None and sparsity.engine is not None else None
    try:
        costs = collect_weight_costs(pl_module)
    except ValueError as error:  # a weight of unknown cost (lightning_selfish.flops)
        return format_summary(summary, None, None) + f"\nFLOPs per token not counted: {error}"
    return format_summary(summary, costs, active)


def flops_per_token_by_layer(
    layer_names: Sequence[str], costs: Mapping[str, WeightCost], active: Mapping[str, int] | None
) -> list[int]:
    """Forward FLOPs per token of each layer of the summary: its weights' (``name.`` prefix), with ``active``."""
    return [
        round(inference_flops_per_token({k: c for k, c in costs.items() if k.startswith(f"{layer}.")}, active))
        for layer in layer_names
    ]


def format_summary(summary: Any, costs: Mapping[str, WeightCost] | None, active: Mapping[str, int] | None) -> str:
    """Lightning's summary table (``summary``: its ``utilities.model_summary.ModelSummary``) with a column of forward
    FLOPs per token and their total with ``active`` (the masks' active counts; None: dense) and dense; without
    ``costs`` (weights of unknown cost), no FLOPs at all."""
    count = _model_summary.get_human_readable_count
    columns = [
        ("", [str(k) for k in range(len(summary.layer_names))]),
        ("Name", list(summary.layer_names)),
        ("Type", list(summary.layer_types)),
        ("Params", [count(n) for n in summary.param_nums]),
        ("Mode", ["train" if mode else "eval" for mode in summary.training_modes]),
    ]
    if costs is not None:
        flops = flops_per_token_by_layer(summary.layer_names, costs, active)
        columns.append(("FLOPs per token", [f"{n:,}" for n in flops]))
    leftover = summary.total_parameters - summary.total_layer_params
    if leftover > 0:  # parameters of the model itself, in no listed layer (as Lightning lists them)
        rows = ["", "Other params", "n/a", count(leftover), "n/a", "n/a"][: len(columns)]
        columns = [(title, [*values, row]) for (title, values), row in zip(columns, rows)]
    widths = [max(len(title), *(len(v) for v in values)) for title, values in columns]
    lines = [" | ".join(title.ljust(w) for (title, _), w in zip(columns, widths))]
    rule = "-" * len(lines[0])
    lines.append(rule)
    for row in zip(*(values for _, values in columns)):
        lines.append(" | ".join(value.ljust(w) for value, w in zip(row, widths)))
    lines.append(rule)
    modes = summary.total_training_modes
    totals = [
        (count(summary.trainable_parameters), "Trainable params"),
        (count(summary.total_parameters - summary.trainable_parameters), "Non-trainable params"),
        (count(summary.total_parameters), "Total params"),
        (f"{summary.model_size:,.3f}", "Total estimated model params size (MB)"),
        (str(modes["train"]), "Modules in train mode"),
        (str(modes["eval"]), "Modules in eval mode"),
    ]
    if costs is not None:
        dense = round(inference_flops_per_token(costs))
        if active is None:
            totals.append((f"{dense:,}", "Inference FLOPs per token (dense)"))
        else:
            sparse = round(inference_flops_per_token(costs, active))
            totals.append((f"{sparse:,}", f"Inference FLOPs per token (with this run's masks; dense {dense:,})"))
    lines.extend(f"{value:<9} {label}" for value, label in totals)
    return "\n".join(line.rstrip() for line in lines)
