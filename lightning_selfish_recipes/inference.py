"""Sparse CPU inference for the four recipe models: :func:`sparse_network` and ``selfish-rnn test --sparse_inference``.

:func:`lightning_selfish.inference.to_sparse` converts ``nn.LSTM`` and ``nn.Linear`` by itself, which covers the
stacked LSTM. The other models compute with their weights in their own code; the converters here give them the
same per-tensor choice (CSR or dense):

* AWD-LSTM-MoS: each :class:`~lightning_selfish_recipes.models.WeightDrop` LSTM (in eval the dropout is the identity:
  the LSTM with its raw recurrent weight) becomes a :class:`~lightning_selfish.inference.SparseRNN`; ``latent`` and
  ``decoder`` are ``nn.Linear`` (the decoder multiplies ``K`` rows per token: ``rows = K·batch·steps``);
* ON-LSTM: each :class:`~lightning_selfish_recipes.models.ONLSTMCell` becomes :class:`SparseONLSTMCell` (its ``hh``
  weight as the eval DropConnect weight ``weight·(1-p)``);
* RHN: the whole network becomes :class:`SparseRHN` (the recurrence reads ``W``, ``R`` and ``fc1`` directly).

Every model gives the same log-probabilities as the dense one within float tolerance (tests/test_inference_recipes.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish.inference import (
    Choose,
    ConversionContext,
    Converter,
    SparseLinear,
    SparseRNN,
    qualified_name,
    sparse_inference_basis,
    sparse_inference_report,
    to_sparse,
)
from lightning_selfish_recipes.compat import module, pl
from lightning_selfish_recipes.models import RHN, ONLSTMCell, WeightDrop
from lightning_selfish_recipes.models.common import LMOutput
from lightning_selfish_recipes.models.on_lstm import onlstm_step

rank_zero_info = module("utilities.rank_zero").rank_zero_info

__all__ = ["RECIPE_CONVERTERS", "SparseInference", "SparseONLSTMCell", "SparseRHN", "sparse_network"]


class SparseONLSTMCell(nn.Module):
    """:class:`~lightning_selfish_recipes.models.ONLSTMCell` in eval, with ``ih`` and ``hh`` each CSR or dense (same
    math and state)."""

    def __init__(self, cell: ONLSTMCell, context: ConversionContext, prefix: str) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.chunk_size = cell.input_size, cell.hidden_size, cell.chunk_size
        self.n_chunk = cell.n_chunk
        ih, hh = cell.ih[0], cell.hh
        rows = context.batch_size * context.steps
        ih_choice = context.choose(qualified_name(prefix, "ih.0.weight"), ih.weight, rows)
        hh_weight = hh.effective_weight().detach()  # eval: weight * (1 - p), exactly what the cell multiplies by
        hh_choice = context.choose(qualified_name(prefix, "hh.weight"), hh.weight, context.batch_size)
        bias = ih.bias.detach() if hh.bias is None else ih.bias.detach() + hh.bias.detach()
        self.ih = SparseLinear(ih.weight, bias, ih_choice.sparse, ih_choice)
        self.hh = SparseLinear(hh_weight, None, hh_choice.sparse, hh_choice)

    def init_hidden(self, batch_size: int) -> tuple[Tensor, Tensor]:
        w = self.ih.bias
        return w.new_zeros(batch_size, self.hidden_size), w.new_zeros(batch_size, self.n_chunk, self.chunk_size)

    def forward(self, input: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, c = hidden
        C, K = self.n_chunk, self.chunk_size
        x_gates = self.ih(input)
        outputs = []
        for t in range(input.size(0)):
            gates = self.hh.addmm(x_gates[t], h)
            h, c = onlstm_step(gates, c, C, K)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class SparseRHN(nn.Module):
    """:class:`~lightning_selfish_recipes.models.RHN` in eval, with ``W``, every ``R`` and ``fc1`` each CSR or dense
    (same math)."""

    def __init__(self, rhn: RHN, context: ConversionContext, prefix: str) -> None:
        super().__init__()
        self.ntoken, self.ninp, self.nhid, self.depth = rhn.ntoken, rhn.ninp, rhn.nhid, rhn.depth
        self.alpha, self.beta = rhn.alpha, rhn.beta
        self.embedding = rhn.embedding
        batch, rows = context.batch_size, context.batch_size * context.steps
        first = rhn.highways[0]
        w_choice = context.choose(qualified_name(prefix, "highways.0.W.weight"), first.W.weight, rows)
        self.W = SparseLinear(first.W.weight, first.W.bias.detach() + first.R.bias.detach(), w_choice.sparse, w_choice)
        self.R = nn.ModuleList()
        for k, block in enumerate(rhn.highways):
            choice = context.choose(qualified_name(prefix, f"highways.{k}.R.weight"), block.R.weight, batch)
            self.R.append(SparseLinear(block.R.weight, None if k == 0 else block.R.bias, choice.sparse, choice))
        fc1 = context.choose(qualified_name(prefix, "fc1.weight"), rhn.fc1.weight, rows)
        self.fc1 = SparseLinear(rhn.fc1.weight, rhn.fc1.bias, fc1.sparse, fc1)

    def init_hidden(self, batch_size: int) -> Tensor:
        return self.embedding.weight.new_zeros(batch_size, self.nhid)

    def forward(self, input: Tensor, hidden: Tensor) -> LMOutput:
        x = F.embedding(input, self.embedding.weight)
        wx = self.W(x)
        H, s = self.nhid, hidden
        outputs = []
        for t in range(x.size(0)):
            for k in range(self.depth):
                pre = self.R[0].addmm(wx[t], s) if k == 0 else self.R[k](s)
                h = torch.tanh(pre[:, :H])
                gate = torch.sigmoid(pre[:, H:])
                s = torch.lerp(s, h, gate)
            outputs.append(s)
        output = torch.stack(outputs)
        logits = self.fc1(output.reshape(-1, self.nhid))
        return LMOutput(F.log_softmax(logits, dim=-1), s, None, None)


def _convert_weight_drop(wrapper: WeightDrop, prefix: str, context: ConversionContext) -> nn.Module | None:
    lstm = wrapper.module
    if type(lstm) not in (nn.LSTM, nn.GRU, nn.RNN):
        return wrapper  # (its RNN's own weights live on the wrapper: nothing inside converts on its own)
    extra = {"nonlinearity": lstm.nonlinearity} if type(lstm) is nn.RNN else {}
    reference = next(lstm.parameters())
    plain = type(lstm)(
        lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias, batch_first=lstm.batch_first, **extra
    ).to(device=reference.device, dtype=reference.dtype)
    sparse, choices = {}, {}
    with torch.no_grad():
        for name, _ in plain.named_parameters(recurse=False):  # the RNN's weights and biases, in its order
            raw = name in wrapper.weights
            value = getattr(wrapper, f"{name}_raw") if raw else getattr(lstm, name)
            getattr(plain, name).copy_(value)  # eval: F.dropout is the identity, the raw weight is what runs
            if name.startswith("weight"):
                rows = context.batch_size * (context.steps if "_ih_" in name else 1)
                shown = f"{name}_raw" if raw else f"module.{name}"
                choices[name] = context.choose(qualified_name(prefix, shown), value, rows)
                sparse[name] = choices[name].sparse
    if not any(sparse.values()):
        return wrapper  # dense: the wrapper as it is (its LSTM reads the raw weight through the wrapper)
    return SparseRNN(plain, sparse, choices)


def _convert_onlstm_cell(cell: ONLSTMCell, prefix: str, context: ConversionContext) -> nn.Module | None:
    converted = SparseONLSTMCell(cell, context, prefix)
    return converted if converted.ih.sparse or converted.hh.sparse else cell


def _convert_rhn(rhn: RHN, prefix: str, context: ConversionContext) -> nn.Module | None:
    converted = SparseRHN(rhn, context, prefix)
    return converted if any(layer.sparse for layer in (converted.W, converted.fc1, *converted.R)) else rhn


RECIPE_CONVERTERS: dict[type, Converter] = {
    WeightDrop: _convert_weight_drop,
    ONLSTMCell: _convert_onlstm_cell,
    RHN: _convert_rhn,
}
"""The recipe models' own modules, for ``to_sparse(converters=...)``."""


def sparse_network(
    network: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    batch_size: int = 1,
    steps: int = 1,
    choose: Choose = "crossover",
    inplace: bool = False,
) -> nn.Module:
    """A recipe network (any of the four) converted for sparse inference (a copy unless ``inplace``).

    ``masks`` are keyed like the network's parameters and multiplied in first. The MoS decoder multiplies
    ``n_experts`` rows per token, so it is decided at ``rows = K·batch·steps``.
    """
    experts = int(getattr(network, "n_experts", 0) or 0)

    def linear(module: nn.Linear, prefix: str, context: ConversionContext) -> nn.Module | None:
        rows = context.batch_size * context.steps * (experts if experts and prefix == "decoder" else 1)
        choice = context.choose(qualified_name(prefix, "weight"), module.weight, rows)
        return SparseLinear.from_linear(module, choice=choice) if choice.sparse else None

    return to_sparse(
        network,
        masks,
        batch_size=batch_size,
        steps=steps,
        choose=choose,
        converters={**RECIPE_CONVERTERS, nn.Linear: linear},
        inplace=inplace,
    )


class SparseInference(pl.Callback):
    """``selfish-rnn test --sparse_inference``: test the checkpoint's network converted by :func:`sparse_network`.

    The conversion runs at the start of the test loop, after Lightning has loaded the checkpoint, for the test
    batch size and window length of the datamodule; the per-tensor choice and the test loop's time are logged.
    ``choose`` is :func:`~lightning_selfish.inference.to_sparse`'s; None: the crossover table on the CPU, measured
    on other devices.
    """

    def __init__(self, choose: Choose | None = None) -> None:
        self.choose = choose
        self._start: float | None = None

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        datamodule = trainer.datamodule
        batch = int(getattr(datamodule, "test_batch_size", None) or 1)
        steps = int(getattr(datamodule, "bptt", None) or 1)
        # The crossover table was measured on a CPU; elsewhere each tensor's two formats are timed on the device.
        choose = self.choose or ("crossover" if pl_module.device.type == "cpu" else "measure")
        pl_module.network = sparse_network(pl_module.network, batch_size=batch, steps=steps, choose=choose)
        report = sparse_inference_report(pl_module.network)
        csr = [c for c in report if c.sparse]
        rank_zero_info(
            f"selfish-rnn test: sparse inference, {len(csr)} of {len(report)} weight tensors sparse "
            f"(batch {batch}, window {steps}; {sparse_inference_basis(pl_module.network)}):"
        )
        for choice in report:
            rank_zero_info(f"  {choice.name} {list(choice.shape)}: {choice.format}, {choice.reason}")
        self._start = time.perf_counter()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        if self._start is not None:
            rank_zero_info(f"selfish-rnn test: the sparse test loop took {time.perf_counter() - self._start:.1f} s")


def add_sparse_inference_argument(parser: Any) -> None:
    """``selfish-rnn test --sparse_inference``: the option, added to the ``test`` subcommand's parser."""
    parser.add_argument(
        "--sparse_inference",
        type=bool,
        default=False,
        help="Test the network converted for sparse CPU inference (CSR or dense per weight tensor, by density and "
        "the test batch size; lightning_selfish.inference.to_sparse): the same perplexity within float "
        "rounding, the per-tensor choice and the test loop's time are printed.",
    )


def enable_sparse_inference(trainer: Any, test_config: Any) -> None:
    """Add :class:`SparseInference` to the trainer when ``--sparse_inference true`` was given."""
    if test_config.get("sparse_inference"):
        trainer.callbacks.append(SparseInference())
