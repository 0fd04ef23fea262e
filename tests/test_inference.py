"""Sparse inference (lightning_selfish.inference): the converted modules compute what PyTorch's dense ones do, and the
conversion decides CSR or dense per tensor by its density, its size and the rows it multiplies."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyLM
from torch import nn

from lightning_selfish.inference import (
    CPU_CROSSOVER,
    SparseLinear,
    SparseRNN,
    SparseRNNCell,
    TensorChoice,
    choose_format,
    crossover_density,
    csr_matrix,
    sparse_inference_report,
    to_sparse,
)


def exact_density_(module: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mask every 2-D parameter to exactly round(density * numel) active entries; returns the masks."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() == 2:
                keep = round(density * param.numel())
                order = torch.randperm(param.numel(), generator=g)[:keep]
                mask = torch.zeros(param.numel(), dtype=torch.bool)
                mask[order] = True
                masks[name] = mask.view_as(param)
                param.mul_(masks[name])
    return masks


def assert_close(a, b) -> None:
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y)
        return
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- the kernels


def test_csr_matrix_keeps_exactly_the_nonzeros_with_32_bit_indices() -> None:
    weight = torch.tensor([[0.0, 1.5, 0.0], [-2.0, 0.0, 3.0]])
    csr = csr_matrix(weight)
    assert csr.layout == torch.sparse_csr
    assert csr.crow_indices().dtype == torch.int32 and csr.col_indices().dtype == torch.int32
    assert csr.crow_indices().tolist() == [0, 1, 3]
    assert csr.col_indices().tolist() == [1, 0, 2]
    assert csr.values().tolist() == [1.5, -2.0, 3.0]
    assert torch.equal(csr.to_dense(), weight)


@pytest.mark.parametrize("shape", [(1, 7), (5, 7), (2, 3, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_is_the_linear_layer_for_any_leading_shape(shape, bias) -> None:
    linear = nn.Linear(7, 4, bias=bias)
    exact_density_(linear, 0.3)
    x = torch.randn(*shape)
    for sparse in (True, False):
        layer = SparseLinear.from_linear(linear, sparse=sparse).eval()
        out = layer(x)
        assert out.is_contiguous()  # the models .view() what a linear layer returns
        assert_close(out, linear(x).detach())
    base = torch.randn(5, 4)
    rows = torch.randn(5, 7)
    naive = base + rows @ linear.weight.detach().t()  # addmm leaves the bias out
    assert_close(SparseLinear.from_linear(linear).addmm(base, rows), naive)
    assert_close(SparseLinear.from_linear(linear).addmm(base[:1], rows[:1]), naive[:1])


# ------------------------------------------------------------------------------------------------- RNNs and cells


def naive_lstm(x, h, c, layers):
    """PyTorch's LSTM equations written out, gate order i, f, g, o: the reference of the reference."""
    outputs = []
    for t in range(x.size(0)):
        inp = x[t]
        new_h, new_c = [], []
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
            gates = inp @ w_ih.t() + b_ih + h[k] @ w_hh.t() + b_hh
            i, f, g, o = gates.chunk(4, 1)
            ck = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
            hk = torch.sigmoid(o) * torch.tanh(ck)
            new_h.append(hk)
            new_c.append(ck)
            inp = hk
        h, c = torch.stack(new_h), torch.stack(new_c)
        outputs.append(inp)
    return torch.stack(outputs), (h, c)


@torch.no_grad()
def test_sparse_lstm_follows_the_lstm_equations() -> None:
    lstm = nn.LSTM(6, 5, num_layers=2).eval()
    exact_density_(lstm, 0.3)
    sparse = to_sparse(lstm, choose="sparse", batch_size=3, steps=4)
    x, h0, c0 = torch.randn(4, 3, 6), torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    layers = [
        tuple(getattr(lstm, f"{w}_l{k}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) for k in range(2)
    ]
    assert_close(sparse(x, (h0, c0)), naive_lstm(x, h0, c0, layers))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("options", [{}, {"batch_first": True}, {"bias": False}])
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_sparse_rnn_equals_pytorchs_rnn(kind, options, batch) -> None:
    cls = {"lstm": nn.LSTM, "gru": nn.GRU}.get(kind, nn.RNN)
    extra = {"nonlinearity": kind[4:]} if cls is nn.RNN else {}
    rnn = cls(6, 5, num_layers=2, **options, **extra).eval()
    exact_density_(rnn, 0.3)
    sparse = to_sparse(rnn, choose="sparse", batch_size=batch, steps=4)
    assert isinstance(sparse, SparseRNN)
    assert all(layer.weight.layout == torch.sparse_csr for layer in [*sparse.ih, *sparse.hh])
    x = torch.randn(batch, 4, 6) if options.get("batch_first") else torch.randn(4, batch, 6)
    h0 = torch.randn(2, batch, 5)
    hx = (h0, torch.randn(2, batch, 5)) if cls is nn.LSTM else h0
    assert_close(sparse(x), rnn(x))
    assert_close(sparse(x, hx), rnn(x, hx))
    unbatched = torch.randn(4, 6)
    assert_close(sparse(unbatched), rnn(unbatched))


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
@torch.no_grad()
def test_sparse_cells_equal_pytorchs_cells(cls) -> None:
    cell = cls(6, 5).eval()
    exact_density_(cell, 0.3)
    sparse = to_sparse(cell, choose="sparse")
    assert isinstance(sparse, SparseRNNCell)
    x = torch.randn(3, 6)
    hx = (torch.randn(3, 5), torch.randn(3, 5)) if cls is nn.LSTMCell else torch.randn(3, 5)
    assert_close(sparse(x), cell(x))
    assert_close(sparse(x, hx), cell(x, hx))
    assert_close(sparse(x[0]), cell(x[0]))


@torch.no_grad()
def test_a_mixed_lstm_computes_dense_layers_dense_and_sparse_layers_csr() -> None:
    lstm = nn.LSTM(6, 5, num_layers=2).eval()
    exact_density_(lstm, 0.3)
    with torch.no_grad():
        lstm.weight_ih_l1.copy_(torch.randn(20, 5))  # density 1: stays dense
    sparse = to_sparse(lstm, crossover=[(1000, 0.5)], min_elements=0)
    assert [layer.sparse for layer in sparse.ih] == [True, False]
    assert [layer.sparse for layer in sparse.hh] == [True, True]
    assert sparse.ih[1].weight.layout == torch.strided
    x = torch.randn(4, 1, 6)
    assert_close(sparse(x), lstm(x))


def test_the_converted_modules_refuse_training_mode() -> None:
    sparse = to_sparse(nn.LSTM(4, 3), choose="sparse")
    sparse.train()
    with pytest.raises(RuntimeError, match="inference only.*call .eval\\(\\)"):
        sparse(torch.randn(2, 1, 4))


# ------------------------------------------------------------------------------------------------- the choice


def test_crossover_density_takes_the_next_larger_row_count() -> None:
    table = [(1, 0.4), (20, 0.3), (700, 0.1)]
    assert [crossover_density(r, table) for r in (1, 2, 20, 21, 700, 5000)] == [0.4, 0.3, 0.3, 0.1, 0.1, 0.1]
    assert crossover_density(1) == dict(CPU_CROSSOVER)[1]
    with pytest.raises(ValueError, match="rows must be a positive int, got 0"):
        crossover_density(0)


def test_choose_format_decides_by_density_rows_and_size() -> None:
    weight = torch.zeros(10, 10)
    weight.view(-1)[:30] = 1.0  # density exactly 0.3
    table = [(1, 0.4), (20, 0.3), (700, 0.1)]
    assert choose_format("w", weight, 1, "crossover", table, min_elements=0).sparse
    assert choose_format("w", weight, 20, "crossover", table, min_elements=0).sparse  # 0.3 <= 0.3
    assert not choose_format("w", weight, 21, "crossover", table, min_elements=0).sparse  # 0.3 > 0.1
    small = choose_format("w", weight, 1, "crossover", table, min_elements=101)
    assert not small.sparse and "100 entries < 101" in small.reason
    assert choose_format("w", weight, 700, "sparse").sparse
    choice = choose_format("w", weight, 1, "crossover", table, min_elements=0)
    assert choice == TensorChoice("w", (10, 10), 0.3, 1, True, "density 0.300 <= 0.4 at 1 rows")


def test_measured_choice_keeps_the_faster_of_the_two_timings() -> None:
    weight = torch.randn(64, 32) * (torch.rand(64, 32) < 0.1)
    choice = choose_format("w", weight, 1, "measure")
    assert choice.dense_ms > 0 and choice.sparse_ms > 0
    assert choice.sparse == (choice.sparse_ms < choice.dense_ms)


@torch.no_grad()
def test_to_sparse_reports_every_tensor_and_converts_only_where_csr_pays() -> None:
    model = TinyLM().eval()  # encoder, 2-layer nn.LSTM 12 -> 16, decoder 16 -> 40
    exact_density_(model, 0.25)
    # Generation at batch 2: every product multiplies 2 rows, where the table allows CSR up to density 0.3;
    # min_elements=700 keeps the decoder (40 x 16 = 640 entries) dense, not the LSTM's (64 x 12 = 768, 64 x 16).
    converted = to_sparse(model, batch_size=2, crossover=[(2, 0.3), (10, 0.2)], min_elements=700)
    report = {c.name: c for c in sparse_inference_report(converted)}
    lstm = {f"rnn.weight_{w}_l{k}" for w in ("ih", "hh") for k in (0, 1)}
    assert set(report) == lstm | {"decoder.weight"}
    assert {name for name, c in report.items() if c.sparse} == lstm
    assert report["decoder.weight"].reason == "640 entries < 700: a small matrix is faster dense"
    assert isinstance(converted.rnn, SparseRNN) and type(converted.decoder) is nn.Linear
    assert type(model.rnn) is nn.LSTM, "the original is left as it was (a copy was converted)"
    # a window of 5 steps at batch 2: the input products multiply 10 rows (0.25 > 0.2: dense), recurrent 2 rows
    window = to_sparse(model, batch_size=2, steps=5, crossover=[(2, 0.3), (10, 0.2)], min_elements=0)
    layouts = {c.name: c.sparse for c in sparse_inference_report(window)}
    assert layouts == {
        "rnn.weight_ih_l0": False,
        "rnn.weight_hh_l0": True,
        "rnn.weight_ih_l1": False,
        "rnn.weight_hh_l1": True,
        "decoder.weight": False,
    }
    x = torch.randint(0, 40, (5, 2))
    model.hidden = converted.hidden = window.hidden = None
    expected = model(x)
    window.hidden = None
    assert_close(window(x), expected)


@torch.no_grad()
def test_to_sparse_applies_the_masks_to_its_copy_only() -> None:
    model = nn.Sequential(nn.Linear(8, 6)).eval()
    mask = torch.rand(6, 8) < 0.3
    original = model[0].weight.clone()
    converted = to_sparse(model, {"0.weight": mask}, choose="sparse")
    assert torch.equal(model[0].weight, original)
    assert torch.equal(converted[0].weight.to_dense(), original * mask)


def test_to_sparse_leaves_unsupported_and_excluded_modules_dense() -> None:
    model = nn.ModuleDict({"bi": nn.LSTM(4, 3, bidirectional=True), "keep": nn.Linear(4, 4), "go": nn.Linear(4, 4)})
    converted = to_sparse(model, choose="sparse", exclude=["keep"])
    assert type(converted["bi"]) is nn.LSTM and type(converted["keep"]) is nn.Linear
    assert isinstance(converted["go"], SparseLinear)
    reasons = {c.name: c.reason for c in sparse_inference_report(converted)}
    assert reasons["bi.weight_ih_l0_reverse"] == "kept dense: bidirectional LSTM is not supported"
    assert "keep.weight" not in reasons


def test_to_sparse_refuses_bad_arguments() -> None:
    model = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        to_sparse("model")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        to_sparse(model, batch_size=0)
    expected = "choose must be 'crossover', 'measure', 'sparse', 'csr', 'csr16' or 'bitmask', got 'fast'"
    with pytest.raises(ValueError, match=expected):
        to_sparse(model, choose="fast")
    with pytest.raises(ValueError, match="mask 'bias2' names no parameter"):
        to_sparse(model, {"bias2": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="mask 'weight' must be a bool tensor, got torch.float32"):
        to_sparse(model, {"weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match=r"mask 'weight' has shape \(3,\), the parameter has \(3, 3\)"):
        to_sparse(model, {"weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="was not converted by lightning_selfish.inference.to_sparse"):
        sparse_inference_report(model)


LSTM_WEIGHTS = {f"rnn.weight_{w}_l{k}" for w in ("ih", "hh") for k in (0, 1)}
RECURRENT = {"rnn.weight_hh_l0", "rnn.weight_hh_l1"}


@pytest.mark.parametrize(
    ("density", "csr_generation", "csr_evaluation"),
    [(0.33, set(), set()), (0.2, LSTM_WEIGHTS, RECURRENT), (0.1, LSTM_WEIGHTS, LSTM_WEIGHTS)],
)
def test_the_assumed_table_keeps_the_papers_density_dense_and_sparsifies_lower_ones(
    density, csr_generation, csr_evaluation
) -> None:
    """CPU_CROSSOVER (the table measured on the project's Intel Xeon, torch CSR only): at the paper's density 0.33
    every weight stays dense; at 0.2 the LSTM goes CSR for generation (1 row per product) and, at batch 20 x 35
    steps, in its recurrent products (20 rows) but not its input products (700 rows, CSR up to 0.1); at 0.1 in both.
    The decoder (50 x 400) is too small."""
    from lightning_selfish_recipes.models import StackedLSTM

    network = StackedLSTM(ntoken=50, ninp=400, nhid=400).eval()  # LSTM weights 1600 x 400 (640,000 entries)
    exact_density_(network, density)
    generation = sparse_inference_report(to_sparse(network, batch_size=1, crossover=CPU_CROSSOVER))
    evaluation = sparse_inference_report(to_sparse(network, batch_size=20, steps=35, crossover=CPU_CROSSOVER))
    assert {c.name for c in generation if c.sparse} == csr_generation
    assert {c.name for c in evaluation if c.sparse} == csr_evaluation
    assert {c.name for c in generation} == LSTM_WEIGHTS | {"decoder.weight"}


def test_the_cpu_crossover_is_refused_for_a_model_on_another_device() -> None:
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"crossover measured on the CPU, but the model is on \['meta'\]"):
        to_sparse(model)


def test_measuring_leaves_the_global_random_stream_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    choose_format("w", torch.randn(8, 8, generator=torch.Generator().manual_seed(1)), 2, "measure")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_on_cuda_the_sparse_lstm_uses_cusparse_csr_and_equals_cudnn() -> None:
    lstm = nn.LSTM(64, 48, num_layers=2).eval()
    exact_density_(lstm, 0.2)
    lstm = lstm.cuda()
    sparse = to_sparse(lstm, choose="sparse", batch_size=3, steps=5)
    assert sparse.hh[0].weight.is_cuda and sparse.hh[0].weight.layout == torch.sparse_csr
    x = torch.randn(5, 3, 64, device="cuda")
    torch.testing.assert_close(sparse(x), lstm(x), rtol=1e-4, atol=1e-5)
    measured = to_sparse(lstm, choose="measure", batch_size=1)
    assert all(c.dense_ms > 0 and c.sparse_ms > 0 for c in sparse_inference_report(measured))
