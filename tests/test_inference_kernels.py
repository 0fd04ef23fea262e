"""The compiled kernels and the per-machine crossover of sparse inference (lightning_selfish.inference): the bit-mask
and CSR16 products against the dense product in float64 on every instruction-set path this CPU runs, the formats'
bytes, the build without a C compiler, the crossover table measured, cached, re-measured and shipped, and batch-1
generation of the paper's stacked LSTM sampling the dense model's words."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_selfish.analysis import pack_mask
from lightning_selfish.inference import (
    CROSSOVER_ENV,
    DENSE_MARGIN,
    KERNEL_ISA_ENV,
    BitmaskMatrix,
    CrossoverTable,
    Csr16Matrix,
    MachineKey,
    SparseLinear,
    SparseRNN,
    cpu_name,
    load_kernels,
    machine_crossover,
    sparse_inference_basis,
    sparse_inference_report,
    to_sparse,
)
from lightning_selfish.inference import crossover as crossover_module
from lightning_selfish.inference.kernels import ISAS

KERNELS = load_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler: the compiled kernels are skipped")
RUNNABLE_ISAS = ISAS[: ISAS.index(KERNELS.best_isa) + 1] if KERNELS else ()
FORMAT_CLASSES = {"bitmask": BitmaskMatrix, "csr16": Csr16Matrix}


def sparse_weight(shape, density, generator, empty_rows=(), empty_cols=()) -> torch.Tensor:
    weight = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < density)
    weight[list(empty_rows), :] = 0.0
    weight[:, list(empty_cols)] = 0.0
    return weight


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x W^T`` in float64: the rule, summed in another order and precision than any kernel."""
    return (x.double() @ weight.double().t()).float()


def assert_product_close(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    # float32 sums of up to `in` terms in another order: the error scales with sum |w||x| per output
    scale = (x.double().abs() @ weight.double().abs().t()).float()
    expected = reference(x, weight)
    assert got.shape == expected.shape
    assert torch.all((got - expected).abs() <= 1e-6 * scale + 1e-6), (got - expected).abs().max()


# ------------------------------------------------------------------------------------------------- the kernels


@needs_kernels
@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("format", ["bitmask", "csr16"])
@pytest.mark.parametrize(
    ("shape", "density"),
    [
        ((1, 1), 1.0),
        ((3, 7), 0.5),
        ((17, 65), 0.33),
        ((64, 64), 0.0),
        ((130, 200), 0.05),
        ((5, 129), 1.0),
        ((40, 300), 0.7),
    ],
)
def test_kernels_equal_the_dense_product(isa, format, shape, density) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    weight = sparse_weight(shape, density, generator, empty_rows=[0], empty_cols=[shape[1] - 1])
    matrix = FORMAT_CLASSES[format](weight, KERNELS, isa)
    assert matrix.isa == isa
    assert torch.equal(matrix.to_dense(), weight), "the format holds exactly the weight"
    for rows in (1, 2, 20, 37, 70):  # one row (mv), and tiles of 16/64 lanes with unaligned tails
        x = torch.randn(rows, shape[1], generator=generator)
        got = matrix.mv(x[0]).unsqueeze(0) if rows == 1 else matrix.mm(x)
        assert_product_close(got, x, weight)
        if rows > 1:
            assert_product_close(matrix.mm(x[:1]), x[:1], weight)  # one row through the matrix product too


@needs_kernels
@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize(
    ("shape", "density"),
    [
        ((300, 1000), 0.33),  # 3 blocks of 128 weight rows (the last partial), 8 panels of 128 columns (the last 104)
        ((129, 256), 0.05),  # panels that end exactly at the last column; most rows a few non-zeros
        ((200, 129), 1.0),  # a one-column last panel; no zero
        ((140, 1), 0.5),  # one column
        ((70, 300), 0.0),  # no non-zero at all
    ],
)
def test_the_many_row_csr16_product_equals_the_dense_product_across_tiles_blocks_and_panels(isa, shape, density):
    """The register-blocked product (kernels.c, SPMM): input rows in tiles of 16 (generic), 32 (AVX2) or 64
    (AVX-512) lanes with unaligned tails, weight rows in blocks, columns in panels; with and without the bias it
    adds as it stores, on a non-contiguous input."""
    generator = torch.Generator().manual_seed(sum(shape))
    empty_cols = [0] if shape[1] > 1 else []
    weight = sparse_weight(
        shape, density, generator, empty_rows=[0, min(128, shape[0] - 1), shape[0] - 1], empty_cols=empty_cols
    )
    matrix = Csr16Matrix(weight, KERNELS, isa)
    bias = torch.randn(shape[0], generator=generator)
    for rows in (2, 15, 16, 17, 33, 64, 65, 130):
        x = torch.randn(shape[1], rows, generator=generator).t()  # (rows, in), not contiguous
        got = matrix.mm(x)
        assert got.shape == (rows, shape[0]) and got.is_contiguous()
        assert_product_close(got, x, weight)
        assert_product_close(matrix.mm(x, bias) - bias, x, weight)
        assert torch.equal(matrix.mm(x, bias), got + bias), "the bias is added to the same sums"


@needs_kernels
def test_csr16_splits_each_row_at_the_panel_boundaries() -> None:
    """``panel_start[r, p]``: the first of row r's non-zeros at a column >= p * CSR16_PANEL, counted naively."""
    from lightning_selfish.inference.formats import CSR16_PANEL

    weight = sparse_weight((9, 2 * CSR16_PANEL + 5), 0.3, torch.Generator().manual_seed(4), empty_rows=[2])
    weight[5, CSR16_PANEL] = 1.0  # a non-zero on a boundary belongs to the panel it starts
    matrix = Csr16Matrix(weight, KERNELS)
    assert matrix.panels == 3 and matrix.panel_start.shape == (9, 4)
    offset = 0
    for r in range(9):
        nonzero = [c for c in range(weight.shape[1]) if weight[r, c] != 0]
        for p in range(4):
            assert matrix.panel_start[r, p] == offset + sum(c < p * CSR16_PANEL for c in nonzero), (r, p)
        offset += len(nonzero)
        assert matrix.panel_start[r, 3] == offset == matrix.row_start[r + 1]


@needs_kernels
def test_the_many_row_product_is_the_same_on_two_threads() -> None:
    """Each weight row is summed by one thread in one order: two threads give the same floats as one."""
    if not KERNELS.openmp:
        pytest.skip("the kernels were built without OpenMP")
    generator = torch.Generator().manual_seed(6)
    weight = sparse_weight((700, 300), 0.33, generator)
    x = torch.randn(100, 300, generator=generator)
    matrix = Csr16Matrix(weight, KERNELS)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matrix.mm(x)
        torch.set_num_threads(2)
        assert torch.equal(matrix.mm(x), one)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_a_bias_of_the_wrong_shape_is_refused() -> None:
    matrix = Csr16Matrix(sparse_weight((6, 10), 0.5, torch.Generator().manual_seed(7)), KERNELS)
    with pytest.raises(ValueError, match=r"bias must be \(6,\) on the CPU, got \(5,\)"):
        matrix.mm(torch.randn(3, 10), torch.randn(5))


@needs_kernels
@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_non_finite_weight_spoils_only_its_own_row(isa, bad) -> None:
    """The AVX-512 product loads 16 values per 16 columns whatever their count (the lanes past it meet zeros): a
    non-finite weight of the next row must not turn this row into nan (0 * inf), as it does not in the dense product."""
    generator = torch.Generator().manual_seed(5)
    weight = sparse_weight((6, 150), 0.33, generator)
    weight[3, 0] = bad  # the first value of row 3: read past the end of row 2's last 16 columns
    weight[3, 149] = 1.0
    matrix = BitmaskMatrix(weight, KERNELS, isa)
    assert not matrix.all_finite
    x = torch.randn(1, 150, generator=generator)
    got = matrix.mv(x[0]).unsqueeze(0)
    expected = reference(x, weight)
    finite = torch.arange(6) != 3
    assert_product_close(got[:, finite], x, weight[finite])
    torch.testing.assert_close(got[:, 3], expected[:, 3], equal_nan=True)
    padded = BitmaskMatrix(sparse_weight((6, 150), 0.33, generator), KERNELS, isa)
    assert padded.all_finite and padded.values.numel() == padded.nnz + 16, "16 readable floats past the last value"


@needs_kernels
def test_the_isa_can_be_forced_by_the_environment(monkeypatch) -> None:
    weight = sparse_weight((9, 70), 0.4, torch.Generator().manual_seed(0))
    monkeypatch.setenv(KERNEL_ISA_ENV, "generic")
    assert BitmaskMatrix(weight, KERNELS).isa == "generic"
    monkeypatch.setenv(KERNEL_ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=r"kernel isa must be one of \('generic', 'avx2', 'avx512'\), got 'sse9'"):
        BitmaskMatrix(weight, KERNELS)


@needs_kernels
def test_the_bit_mask_is_the_exports_and_the_bytes_are_counted_from_the_layout() -> None:
    weight = sparse_weight((6, 128), 0.33, torch.Generator().manual_seed(1))  # 128 columns: rows are whole words
    matrix = BitmaskMatrix(weight, KERNELS)
    assert torch.equal(matrix.bits.view(torch.uint8).reshape(-1), pack_mask(weight != 0)["bits"])
    nnz = int((weight != 0).sum())
    assert matrix.nbytes == 4 * nnz + 6 * 2 * 8 + 7 * 8  # values, 2 words per row, row offsets
    odd = sparse_weight((6000, 1500), 0.33, torch.Generator().manual_seed(2))
    nnz = int((odd != 0).sum())
    assert BitmaskMatrix(odd, KERNELS).nbytes == 4 * nnz + 6000 * math.ceil(1500 / 64) * 8 + 6001 * 8
    assert Csr16Matrix(odd, KERNELS).nbytes == 6 * nnz + 6001 * 8
    assert BitmaskMatrix(odd, KERNELS).nbytes <= 0.4 * odd.numel() * 4, "the paper's density reads <= 0.4x dense"


@needs_kernels
@pytest.mark.parametrize("format", ["bitmask", "csr16"])
@torch.no_grad()
def test_an_lstm_and_a_linear_layer_in_kernel_formats_equal_pytorchs(format) -> None:
    generator = torch.Generator().manual_seed(3)
    lstm = nn.LSTM(70, 33, num_layers=2).eval()
    linear = nn.Linear(33, 21).eval()
    for module in (lstm, linear):
        for p in module.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=generator) < 0.33)
    sparse_lstm = to_sparse(lstm, choose=format, batch_size=3, steps=5)
    sparse_linear = to_sparse(linear, choose=format)
    assert isinstance(sparse_lstm, SparseRNN) and all(layer.format == format for layer in sparse_lstm.ih)
    x = torch.randn(5, 3, 70, generator=generator)
    out, (h, c) = sparse_lstm(x)
    expected, (eh, ec) = lstm(x)
    for got, want in ((out, expected), (h, eh), (c, ec)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_linear(out), linear(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_lstm(x[:1, :1])[0], lstm(x[:1, :1])[0], rtol=1e-5, atol=1e-6)


@needs_kernels
@torch.no_grad()
def test_an_evaluation_window_in_csr16_equals_pytorchs() -> None:
    """A 35 x 4 window: the input products over 140 rows (three tiles, the last partial) and the decoder with its
    bias through the many-row kernel, the recurrent ones over 4 rows: log-probabilities as PyTorch's."""
    generator = torch.Generator().manual_seed(8)
    lstm, decoder = nn.LSTM(200, 150, num_layers=2).eval(), nn.Linear(150, 300).eval()
    for module in (lstm, decoder):
        for p in module.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=generator) < 0.33)
    sparse_lstm = to_sparse(lstm, choose="csr16", batch_size=4, steps=35)
    sparse_decoder = to_sparse(decoder, choose="csr16")
    x = torch.randn(35, 4, 200, generator=generator)
    expected = torch.log_softmax(decoder(lstm(x)[0]), dim=-1)
    got = torch.log_softmax(sparse_decoder(sparse_lstm(x)[0]), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)


def test_without_a_c_compiler_the_kernels_are_skipped_with_one_line(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("LIGHTNING_SELFISH_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="lightning_selfish.inference"):
        assert load_kernels() is None
        assert load_kernels() is None
        table = CrossoverTable(MachineKey.current(None), {1: {"csr": (0.0, 1.0)}}, "given")
        model = to_sparse(nn.Linear(64, 32), crossover=table, min_elements=0)
    lines = [r.getMessage() for r in caplog.records if "C compiler" in r.getMessage()]
    assert len(lines) == 1 and "the torch formats (dense, CSR) serve" in lines[0]
    assert sparse_inference_report(model)[0].format in ("csr", "dense")
    with pytest.raises(RuntimeError, match="format 'bitmask' needs the compiled kernels.*no C compiler"):
        to_sparse(nn.Linear(4, 4), choose="bitmask")


# ------------------------------------------------------------------------------------------------- the crossover


def test_the_table_picks_the_format_predicted_fastest_and_keeps_dense_where_unsure() -> None:
    key = MachineKey("Some CPU", "2.13", 1, "avx512")
    table = CrossoverTable(
        key, {1: {"csr": (0.1, 2.0), "bitmask": (0.3, 1.0)}, 700: {"csr": (0.5, 5.0), "bitmask": (0.6, 4.0)}}
    )
    assert table.best(1, 0.1, ["dense", "csr", "bitmask"]) == ("csr", pytest.approx(0.3))
    assert table.best(1, 0.33, ["dense", "csr", "bitmask"]) == ("bitmask", pytest.approx(0.63))
    assert table.best(1, 0.33, ["dense", "csr"]) == ("csr", pytest.approx(0.76))  # (no kernels: torch's formats)
    assert table.best(1, 0.42, ["dense", "csr"]) == ("dense", 1.0)  # csr 0.94: within the margin, keep dense
    assert table.ratio("csr", 1, 0.42) == pytest.approx(0.94) and DENSE_MARGIN == 0.9
    assert table.best(2, 0.05, ["dense", "csr", "bitmask"])[0] == "csr"  # 2 rows: the 700-row fit, 0.75
    assert table.best(5000, 0.2, ["dense", "csr", "bitmask"]) == ("dense", 1.0)  # beyond the table: its last fit


def test_the_machine_table_is_measured_once_cached_remeasured_and_shipped(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(crossover_module, "_MEASURE_SHAPES", {1: (96, 64), 20: (96, 64), 100: (32, 64), 700: (32, 64)})
    measured = machine_crossover(cache=tmp_path)
    assert measured.source == "measured" and Path(measured.path).parent == tmp_path
    assert set(measured.fits) == {1, 20, 100, 700}
    assert set(measured.fits[1]) == {"csr", *(("bitmask", "csr16") if KERNELS else ())}
    assert measured.machine.cpu == cpu_name() and measured.machine.threads == torch.get_num_threads()

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although a table was cached")

    monkeypatch.setattr(crossover_module, "measure_crossover", no_measuring)
    cached = machine_crossover(cache=tmp_path)
    assert cached.source == "cached" and cached.fits == measured.fits
    monkeypatch.undo()
    monkeypatch.setattr(crossover_module, "_MEASURE_SHAPES", {1: (96, 64), 20: (96, 64), 100: (32, 64), 700: (32, 64)})
    assert machine_crossover(cache=tmp_path, remeasure=True).source == "measured"
    shipped = CrossoverTable(MachineKey("Another CPU", "2.13", 1, "none"), {1: {"csr": (0.0, 1.0)}}).save(
        tmp_path / "shipped.json"
    )
    monkeypatch.setenv(CROSSOVER_ENV, str(shipped))
    given = machine_crossover(cache=tmp_path)
    assert given.source == "given" and given.machine.cpu == "Another CPU"
    assert "given (" in given.describe() and "Another CPU" in given.describe()


@needs_kernels
def test_a_table_cached_for_other_kernels_is_measured_again(monkeypatch, tmp_path) -> None:
    """The formats' speed is the kernels': a table measured with an earlier build of kernels.c must not be reused."""
    import dataclasses

    monkeypatch.setattr(crossover_module, "_MEASURE_SHAPES", {1: (96, 64), 20: (96, 64), 100: (32, 64), 700: (32, 64)})
    rebuilt = dataclasses.replace(KERNELS, path=KERNELS.path.with_name("selfish_kernels_0123456789abcdef.so"))
    assert machine_crossover(cache=tmp_path, kernels=KERNELS).source == "measured"
    assert machine_crossover(cache=tmp_path, kernels=KERNELS).source == "cached"
    again = machine_crossover(cache=tmp_path, kernels=rebuilt)
    assert again.source == "measured" and "0123456789abcdef" in again.describe()


def test_cpu_name_is_lscpus_model_name() -> None:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if found is None:
        pytest.skip("no model name in /proc/cpuinfo")
    assert cpu_name() == found.group(1).strip()


def test_the_report_names_the_cpu_and_whether_the_table_was_measured_or_assumed(tmp_path) -> None:
    model = nn.Linear(8, 8)
    table = CrossoverTable.load(
        CrossoverTable(MachineKey(cpu_name(), torch.__version__, 1, "none"), {1: {"csr": (0.0, 1.0)}}).save(
            tmp_path / "t.json"
        )
    )
    assert sparse_inference_basis(to_sparse(model, crossover=table)).startswith("crossover given (")
    assumed = sparse_inference_basis(to_sparse(model, crossover=crossover_module.CPU_CROSSOVER))
    assert assumed.startswith("crossover assumed: CPU_CROSSOVER") and cpu_name() in assumed
    assert cpu_name() in sparse_inference_basis(to_sparse(model, choose="measure"))
    with pytest.raises(ValueError, match="was not converted by lightning_selfish.inference.to_sparse"):
        sparse_inference_basis(model)


# ------------------------------------------------------------------------------------------------- the paper's model


@needs_kernels
@torch.no_grad()
def test_batch_1_generation_of_the_papers_stacked_lstm_samples_the_dense_words() -> None:
    """2 x 1500 LSTM + 10000 x 1500 decoder at density 0.33, every weight a bit mask (and CSR16 for the decoder):
    the same sampled words as the dense model (oneDNN off, the fastest dense path word by word)."""
    from lightning_selfish_recipes.models import StackedLSTM

    torch.manual_seed(0)
    network = StackedLSTM(ntoken=10000, ninp=1500, nhid=1500, nlayers=2).eval()
    generator = torch.Generator().manual_seed(1)
    for param in network.parameters():
        if param.dim() == 2:
            param.mul_(torch.rand(param.shape, generator=generator) < 0.33)
    sparse = to_sparse(network, choose="bitmask", batch_size=1)
    sparse.decoder = SparseLinear.from_linear(network.decoder, format="csr16").eval()

    def sample(model: nn.Module) -> list[int]:
        g = torch.Generator().manual_seed(0)
        hidden, token, words = model.init_hidden(1), torch.zeros(1, 1, dtype=torch.long), []
        for _ in range(6):
            result = model(token, hidden)
            hidden = result.hidden
            token = torch.multinomial(result.log_probs[-1].exp(), 1, generator=g).view(1, 1)
            words.append(int(token))
        return words

    with torch.backends.mkldnn.flags(enabled=False, allow_tf32=None):
        assert sample(sparse) == sample(network)


def _storage_of(held) -> int:
    """Where a held weight's values are (a dense or torch CSR tensor, or a kernel format's packed values)."""
    if isinstance(held, torch.Tensor):
        return held.values().data_ptr() if held.layout == torch.sparse_csr else held.data_ptr()
    return held.values.data_ptr()


def test_one_row_products_are_timed_over_distinct_weights_as_a_model_streams_them(monkeypatch) -> None:
    """Word by word a model reads each weight once, from memory: one weight timed again and again sits in the
    caches, where the bit mask's fewer bytes do not show (it looked 0.93x to 0.96x of dense's time on one weight and
    0.60x to 0.62x over eight, as in the model). The one-row measurement multiplies distinct copies in turn."""
    seen: dict[int, dict] = {}
    real = crossover_module.measure_formats

    def spy(held, x, rounds=5, min_seconds=0.001):
        seen.setdefault(x.shape[0], held)
        return real(held, x, rounds, min_seconds)

    monkeypatch.setattr(crossover_module, "measure_formats", spy)
    monkeypatch.setattr(crossover_module, "_MEASURE_SHAPES", {1: (96, 64), 20: (96, 64), 100: (32, 64), 700: (32, 64)})
    crossover_module.measure_crossover(KERNELS, rounds=1)
    for format, copies in seen[1].items():
        assert len(copies) == 8, format
        dense = [c.to_dense() if hasattr(c, "to_dense") else c for c in copies]
        assert all(torch.equal(d, dense[0]) for d in dense), format  # the same values ...
        pointers = {_storage_of(c) for c in copies}
        assert len(set(pointers)) == 8, format  # ... in memory of their own
    assert all(len(copies) == 1 for copies in seen[20].values())
    assert crossover_module.MachineKey.current(KERNELS).file_name().startswith("crossover_v2_")
