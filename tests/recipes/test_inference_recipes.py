"""Sparse inference and export of the recipe models: the four networks convert, and ``selfish-rnn export``,
``selfish-rnn generate`` and ``selfish-rnn test --sparse_inference`` work on a real tiny run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lightning_selfish.export import load_compressed
from lightning_selfish.inference import SparseRNN, cpu_name, sparse_inference_report
from lightning_selfish_recipes import inference as recipe_inference
from lightning_selfish_recipes.cli import CONFIG_DIR, build_cli, main
from lightning_selfish_recipes.data import LanguageModelingDataModule
from lightning_selfish_recipes.inference import SparseONLSTMCell, SparseRHN, sparse_network
from lightning_selfish_recipes.lm import LanguageModel
from lightning_selfish_recipes.models import ONLSTM, RHN, AWDLSTMMoS, StackedLSTM
from lightning_selfish_recipes.tools.export import export_run, load_network
from lightning_selfish_recipes.tools.generate import generate
from tests.conftest import write_random_corpus

NETWORKS = {
    "stacked_lstm": lambda: StackedLSTM(ntoken=30, ninp=12, nhid=16),
    "rhn": lambda: RHN(ntoken=30, ninp=12, nhid=12, depth=3),
    "onlstm": lambda: ONLSTM(ntoken=30, ninp=10, nhid=20, chunk_size=5),
    "mos": lambda: AWDLSTMMoS(ntoken=30, ninp=8, nhid=12, nhidlast=10, n_experts=3),
}


def sparsify_(network: torch.nn.Module, density: float = 0.3) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if param.dim() == 2 and name not in network.sparsity_exclude:
                param.mul_(torch.rand(param.shape, generator=g) < density)


def assert_same(a, b) -> None:
    if isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(NETWORKS))
@pytest.mark.parametrize(("batch", "steps"), [(1, 1), (3, 5)])
@torch.no_grad()
def test_every_recipe_network_converts_and_computes_the_same_log_probs(family, batch, steps) -> None:
    torch.manual_seed(0)
    network = NETWORKS[family]().eval()
    sparsify_(network)
    converted = sparse_network(network, batch_size=batch, steps=steps, choose="sparse")
    x = torch.randint(0, 30, (steps, batch))
    expected = network(x, network.init_hidden(batch))
    got = converted(x, converted.init_hidden(batch))
    assert_same(got.log_probs, expected.log_probs)
    assert_same(got.hidden, expected.hidden)
    # a second window from the carried state
    assert_same(converted(x, got.hidden).log_probs, network(x, expected.hidden).log_probs)
    report = sparse_inference_report(converted)
    parameters = {name for name, p in network.named_parameters(remove_duplicate=False) if p.dim() == 2}
    parameters -= {"encoder.weight", "embedding.weight"}  # looked up, not multiplied
    assert {c.name for c in report} == parameters, "every weight that multiplies is decided, under its own name"
    assert all(c.sparse for c in report)


def test_each_family_gets_its_sparse_modules() -> None:
    built = {name: sparse_network(make().eval(), choose="sparse") for name, make in NETWORKS.items()}
    assert isinstance(built["stacked_lstm"].rnn, SparseRNN)
    assert isinstance(built["rhn"], SparseRHN)
    assert all(isinstance(cell, SparseONLSTMCell) for cell in built["onlstm"].rnn.cells)
    assert all(isinstance(rnn, SparseRNN) for rnn in built["mos"].rnns)


def test_the_mos_decoder_is_decided_at_k_rows_per_token() -> None:
    network = AWDLSTMMoS(ntoken=30, ninp=8, nhid=12, nhidlast=10, n_experts=3).eval()
    converted = sparse_network(network, batch_size=2, steps=5, choose="crossover")
    rows = {c.name: c.rows for c in sparse_inference_report(converted)}
    assert rows["decoder.weight"] == 3 * 2 * 5 and rows["latent.0.weight"] == 2 * 5
    assert rows["rnns.0.module.weight_ih_l0"] == 10 and rows["rnns.0.weight_hh_l0_raw"] == 2


# ------------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny sparse stacked LSTM trained 5 epochs with SNT-ASGD switching to averaging after epoch 3."""
    root = tmp_path_factory.mktemp("export")
    corpus = write_random_corpus(root, seed=1, vocab=15)
    args = [
        "--config",
        str(CONFIG_DIR / "stacked_lstm_ptb.yaml"),
        "--model.network.init_args.ninp=8",
        "--model.network.init_args.nhid=8",
        "--model.nonmono=1",
        "--data.corpus=tiny",
        f"--data.data_dir={corpus}",
        "--data.batch_size=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
    ]
    with warnings.catch_warnings():  # (a module fixture runs outside conftest's per-test quieting)
        warnings.simplefilter("ignore")
        cli = build_cli(args=["fit", *args, "--trainer.max_epochs=5", "--trainer.limit_train_batches=4"])
    version = Path(cli.trainer.log_dir)
    return {"version": version, "last": version / "checkpoints" / "last.ckpt", "root": root, "args": args}


def test_export_dense_holds_the_masked_averaged_weights_and_loads_into_languagemodel(run, tmp_path) -> None:
    out = tmp_path / "dense.pt"
    assert main_code(["export", str(run["version"]), "--which", "last", "--format", "dense", "--out", str(out)]) == 0
    checkpoint = torch.load(run["last"], map_location="cpu", weights_only=False)
    assert "raw_state_dict" in checkpoint, "the fixture's last checkpoint holds SNT-ASGD averages"
    masks = checkpoint["callbacks"]["SelfishSparsityCallback"]["masks"]
    model = LanguageModel.load_from_checkpoint(out, map_location="cpu")
    state = model.state_dict()
    assert set(state) == set(checkpoint["state_dict"])
    for name, value in checkpoint["state_dict"].items():
        expected = value * masks[name] if name in masks else value
        assert torch.equal(state[name], expected), name
    raw = checkpoint["raw_state_dict"]["network.rnn.weight_hh_l0"]
    assert not torch.equal(state["network.rnn.weight_hh_l0"], raw), "the averages, not the raw weights"
    exported = torch.load(out, weights_only=False)
    assert "callbacks" not in exported and "optimizer_states" not in exported and "raw_state_dict" not in exported
    corpus = LanguageModelingDataModule(corpus="tiny", data_dir=str(run["root"]))
    assert exported["vocabulary"] == corpus.dictionary.idx2word


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns (``torch.equal`` takes -0.0 for +0.0); other tensors as they are."""
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor


def test_export_compressed_restores_exactly_the_dense_export(run, tmp_path) -> None:
    dense = export_run(run["version"], "dense", tmp_path / "d.pt", which="last")
    compressed = export_run(run["version"], "compressed", tmp_path / "c.pt", which="last")
    assert compressed["masked_tensors_compressed_bytes"] < 0.4 * compressed["masked_tensors_dense_bytes"]
    assert abs(compressed["density"] - 0.33) < 0.01
    loaded = load_compressed(tmp_path / "c.pt")
    reference = torch.load(dense["out"], weights_only=False)["state_dict"]
    assert list(loaded.state_dict) == list(reference)
    for name, value in reference.items():  # bit for bit: +0.0 at the masked positions of both, never -0.0
        assert torch.equal(bits(loaded.state_dict[name]), bits(value)), name
    a, b, c = load_network(tmp_path / "d.pt"), load_network(tmp_path / "c.pt"), load_network(run["last"])
    for (name, x), y, z in zip(
        a.network.state_dict().items(), b.network.state_dict().values(), c.network.state_dict().values()
    ):
        assert torch.equal(bits(x), bits(y)) and torch.equal(bits(x), bits(z)), name
    assert a.vocabulary == b.vocabulary and "<eos>" in a.vocabulary
    assert a.masks == {}, "the dense export holds the masked weights only"
    assert sorted(b.masks) == sorted(name for name, p in b.network.named_parameters() if p.dim() == 2)


def main_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_export_and_generate_errors_are_one_line(run, tmp_path, capsys) -> None:
    assert main_code(["export", str(tmp_path / "missing")]) == 2
    missing = tmp_path / "missing"
    expected = f"selfish-rnn export: error: {missing}: no such checkpoint file or run directory\n"
    assert capsys.readouterr().err == expected
    assert main_code(["generate", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfish-rnn generate: error: ") and err.count("\n") == 1
    assert main_code(["export", str(tmp_path)]) == 2
    assert "has no checkpoints/last.ckpt" in capsys.readouterr().err


def test_generate_samples_the_same_words_dense_and_sparse(run, tmp_path, capsys) -> None:
    export_run(run["version"], "compressed", tmp_path / "c.pt", which="last")
    result = generate(tmp_path / "c.pt", words=12, rounds=1, warmup=1, choose="sparse", seed=3)
    assert result["same_words"] is True
    vocabulary = load_network(tmp_path / "c.pt").vocabulary
    assert len(result["text"].split()) == 12 and all(word in vocabulary for word in result["text"].split())
    assert result["words_per_second"]["dense"] > 0 and result["words_per_second"]["sparse"] > 0
    assert len(result["csr_tensors"]) == 5
    low, high = result["speedup_range"]
    assert result["same_network"] is False and low <= result["speedup"] <= high
    assert main_code(["generate", str(run["version"]), "--words", "4", "--rounds", "2", "--warmup", "0"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 4 and "words/s" in err
    # the tiny network is below the size where a sparse format pays: nothing converts, and no ratio is printed
    assert "sparse / dense: nothing was converted, the two are the same network (no speed-up)" in err
    assert f"CPU: {cpu_name()}" in err and "chosen by: crossover measured" in err


def test_test_with_sparse_inference_gives_the_dense_perplexity(run, monkeypatch) -> None:
    def tested(extra: list[str]) -> float:
        args = ["test", *run["args"], "--ckpt_path", str(run["last"]), *extra]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = build_cli(args=args)
        return float(cli.trainer.callback_metrics["test_ppl"]), cli

    dense_ppl, _ = tested([])
    original = recipe_inference.sparse_network
    monkeypatch.setattr(  # every tensor as CSR (the tiny network is below the size where CSR pays)
        recipe_inference, "sparse_network", lambda network, **kw: original(network, **{**kw, "choose": "sparse"})
    )
    sparse_ppl, cli = tested(["--sparse_inference", "true"])
    assert isinstance(cli.model.network.rnn, SparseRNN)
    assert sparse_ppl == pytest.approx(dense_ppl, rel=1e-5)


def test_generate_prints_no_torch_tf32_warning(run, capsys) -> None:
    """Its dense baseline turns oneDNN off; torch's warning about TF32 on Intel GPUs is nothing a user can act on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main_code(["generate", str(run["version"]), "--words", "2", "--rounds", "1", "--warmup", "0"]) == 0
    capsys.readouterr()
    assert not [str(w.message) for w in caught if "TF32" in str(w.message)]
