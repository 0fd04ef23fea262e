"""Tests of lightning_selfish_recipes.data: corpus resolution and checksums, tokenisation, batching, BPTT windows,
DataModule.

Real-corpus tests use the copies bundled with the package (always present, checked against the canonical digests
below); nothing is skipped for want of data. Everything else uses a tiny synthetic corpus.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_selfish_recipes import data as d
from lightning_selfish_recipes.data import sources

# sha256sum of the canonical files (Mikolov's PTB, WikiText-2 v1 tokens), as the reference data lists them.
CANONICAL_SHA256SUMS = """\
dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0  ptb/test.txt
fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf  ptb/train.txt
c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2  ptb/valid.txt
d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0  wikitext-2/test.txt
9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f  wikitext-2/train.txt
f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8  wikitext-2/valid.txt
"""

EXPECTED = {
    "ptb": {"vocab": 10_000, "train": 929_589, "valid": 73_760, "test": 82_430},
    "wikitext-2": {"vocab": 33_278, "train": 2_088_628, "valid": 217_646, "test": 245_569},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with both bundled corpora extracted (once per session)."""
    root = tmp_path_factory.mktemp("cache")
    for name in d.CORPORA:
        d.resolve_corpus(name, cache_dir=root)
    return root


@pytest.fixture(scope="session")
def ptb(cache_root: Path) -> d.Corpus:
    return d.Corpus(cache_root / "ptb")


@pytest.fixture(scope="session")
def wt2(cache_root: Path) -> d.Corpus:
    return d.Corpus(cache_root / "wikitext-2")


def copy_corpus(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for split in d.SPLITS:
        (dst / f"{split}.txt").write_bytes((src / f"{split}.txt").read_bytes())
    return dst


def write_synthetic(directory: Path, seed: int = 0, train_lines: int = 120) -> Path:
    """A small corpus with blank lines, a fixed vocabulary and a word that first appears in valid."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(40)]
    directory.mkdir(parents=True, exist_ok=True)
    for split, n_lines in (("train", train_lines), ("valid", 30), ("test", 30)):
        lines = []
        for _ in range(n_lines):
            n = int(rng.integers(0, 15))
            lines.append(" ".join(rng.choice(words, size=n)))
        if split == "valid":
            lines.append("only_in_valid")
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "synthetic")


# ---------------------------------------------------------------------------------------------------------------
# Bundled archives and checksums
# ---------------------------------------------------------------------------------------------------------------


def test_bundled_sums_are_the_canonical_digests() -> None:
    assert (d.BUNDLED_DIR / "SHA256SUMS").read_text() == CANONICAL_SHA256SUMS


def test_bundled_archives_hold_exactly_the_checksummed_files(cache_root: Path) -> None:
    sums = (d.BUNDLED_DIR / "SHA256SUMS").read_text().split()
    listed = dict(zip(sums[1::2], sums[0::2]))
    assert sorted(listed) == sorted(f"{n}/{s}.txt" for n in d.CORPORA for s in d.SPLITS)
    for name in d.CORPORA:
        with tarfile.open(d.BUNDLED_DIR / f"{name}.tar.xz") as tar:
            assert sorted(tar.getnames()) == ["test.txt", "train.txt", "valid.txt"]
            assert all(m.isfile() for m in tar.getmembers())
        for split in d.SPLITS:
            assert sha256(cache_root / name / f"{split}.txt") == listed[f"{name}/{split}.txt"]
        assert d.expected_digests(name) == {s: listed[f"{name}/{s}.txt"] for s in d.SPLITS}


def test_cache_is_reused_and_missing_files_are_restored(cache_root: Path, tmp_path: Path) -> None:
    assert d.resolve_corpus("ptb", cache_dir=cache_root) == cache_root / "ptb"
    root = tmp_path / "c"
    target = d.resolve_corpus("ptb", cache_dir=root)
    (target / "valid.txt").unlink()
    assert d.resolve_corpus("ptb", cache_dir=root) == target
    assert sha256(target / "valid.txt") == d.expected_digests("ptb")["valid"]
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]


def test_cache_location_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(d.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert d.default_cache_dir() == tmp_path / "home" / ".cache" / "lightning_selfish"
    monkeypatch.setenv(d.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert d.default_cache_dir() == tmp_path / "env"
    assert d.resolve_corpus("ptb") == tmp_path / "env" / "ptb"


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_copy_fails_naming_file_and_digests(damage: str, cache_root: Path, tmp_path: Path) -> None:
    directory = copy_corpus(cache_root / "ptb", tmp_path / "ptb")
    path = directory / "valid.txt"
    raw = bytearray(path.read_bytes())
    if damage == "corrupt":
        raw[len(raw) // 2] ^= 0x01
    else:
        raw = raw[: len(raw) - 1000]
    path.write_bytes(bytes(raw))
    expected = d.expected_digests("ptb")["valid"]
    found = hashlib.sha256(bytes(raw)).hexdigest()

    with pytest.raises(d.CorpusChecksumError) as info:
        d.resolve_corpus("ptb", directory)
    message = str(info.value)
    assert str(path) in message and expected in message and found in message
    assert "data_dir" in message
    assert (info.value.path, info.value.expected, info.value.found) == (path, expected, found)
    assert isinstance(info.value, ValueError)

    # An explicit opt-out accepts the user's own, different copy.
    assert d.resolve_corpus("ptb", directory, verify=False) == directory


def test_damaged_cache_fails_with_instructions(tmp_path: Path) -> None:
    target = d.resolve_corpus("ptb", cache_dir=tmp_path)
    with open(target / "test.txt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(d.CorpusChecksumError, match="delete the directory") as info:
        d.resolve_corpus("ptb", cache_dir=tmp_path)
    assert str(target / "test.txt") in str(info.value)


def test_missing_file_in_data_dir(cache_root: Path, tmp_path: Path) -> None:
    directory = copy_corpus(cache_root / "ptb", tmp_path / "ptb")
    (directory / "test.txt").unlink()
    with pytest.raises(d.CorpusNotFoundError, match="test.txt") as info:
        d.resolve_corpus("ptb", directory)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(d.CorpusNotFoundError, match="not a directory"):
        d.resolve_corpus("ptb", tmp_path / "nowhere")


def test_a_directory_with_the_canonical_files_is_accepted(cache_root: Path, tmp_path: Path) -> None:
    copy = copy_corpus(cache_root / "wikitext-2", tmp_path / "my-wikitext-2")
    assert d.resolve_corpus("wikitext-2", copy) == copy


def test_argument_errors(synthetic: Path) -> None:
    with pytest.raises(ValueError, match="'penn'.*ptb, wikitext-2"):
        d.resolve_corpus("penn")
    with pytest.raises(ValueError, match="verify=False is only accepted together with data_dir"):
        d.resolve_corpus("ptb", verify=False)
    with pytest.raises(ValueError, match="bsz must be a positive int, got 0"):
        d.batchify(torch.arange(10), 0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        d.batchify(torch.arange(10), 6)
    with pytest.raises(ValueError, match="batch_size=20 must be divisible.*world_size=3"):
        d.rank_columns(20, 3, 0)
    with pytest.raises(ValueError, match="max_seq_len_delta=20.*variable_bptt=True"):
        d.LanguageModelingDataModule("ptb", max_seq_len_delta=20)
    with pytest.raises(ValueError, match="corpus='mine' is not bundled"):
        d.LanguageModelingDataModule("mine")
    with pytest.raises(ValueError, match="eval_batch_size must be a positive int, got 0"):
        d.LanguageModelingDataModule("mine", data_dir=str(synthetic), eval_batch_size=0)


def test_custom_corpus_checksums(synthetic: Path) -> None:
    assert d.resolve_corpus("mine", synthetic) == synthetic  # no SHA256SUMS: used as is
    with pytest.raises(d.CorpusNotFoundError, match="SHA256SUMS"):
        d.resolve_corpus("mine", synthetic, verify=True)
    lines = [f"{sha256(synthetic / f'{s}.txt')}  {s}.txt" for s in d.SPLITS]
    (synthetic / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert d.resolve_corpus("mine", synthetic, verify=True) == synthetic
    with open(synthetic / "train.txt", "a") as f:
        f.write("extra\n")
    with pytest.raises(d.CorpusChecksumError, match="train.txt"):
        d.resolve_corpus("mine", synthetic)


# ---------------------------------------------------------------------------------------------------------------
# Download path (offline: file:// URLs)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_bundled_archive", lambda name: None)


@pytest.mark.usefixtures("no_bundle")
def test_download_ptb(cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for split in d.SPLITS:
        (mirror / f"ptb.{split}.txt").write_bytes((cache_root / "ptb" / f"{split}.txt").read_bytes())
    monkeypatch.setattr(sources, "PTB_URLS", {s: (mirror / f"ptb.{s}.txt").as_uri() for s in d.SPLITS})

    with pytest.raises(d.CorpusNotFoundError, match="download=False"):
        d.resolve_corpus("ptb", cache_dir=tmp_path / "cache", download=False)
    target = d.resolve_corpus("ptb", cache_dir=tmp_path / "cache")
    for split, digest in d.expected_digests("ptb").items():
        assert sha256(target / f"{split}.txt") == digest

    # A corrupted upstream file is rejected and leaves nothing in the cache.
    (mirror / "ptb.test.txt").write_bytes(b"not ptb\n")
    with pytest.raises(d.CorpusChecksumError, match="test.txt") as info:
        d.resolve_corpus("ptb", cache_dir=tmp_path / "cache2")
    assert (mirror / "ptb.test.txt").as_uri() in str(info.value)
    assert not (tmp_path / "cache2" / "ptb" / "test.txt").exists()
    assert not list((tmp_path / "cache2" / "ptb").glob(".*.tmp"))


@pytest.mark.usefixtures("no_bundle")
def test_download_wikitext2(cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for split in d.SPLITS:
            zf.write(cache_root / "wikitext-2" / f"{split}.txt", f"wikitext-2/wiki.{split}.tokens")
    monkeypatch.setattr(sources, "WIKITEXT2_URL", archive.as_uri())
    target = d.resolve_corpus("wikitext-2", cache_dir=tmp_path / "cache")
    for split, digest in d.expected_digests("wikitext-2").items():
        assert sha256(target / f"{split}.txt") == digest
    assert sorted(p.name for p in target.iterdir()) == ["test.txt", "train.txt", "valid.txt"]

    archive.write_bytes(b"truncated")
    with pytest.raises(d.CorpusChecksumError, match="not a valid zip"):
        d.resolve_corpus("wikitext-2", cache_dir=tmp_path / "cache2")


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", d.CORPORA)
def test_token_counts_of_the_bundled_corpora(name: str, cache_root: Path) -> None:
    corpus = d.Corpus(cache_root / name)
    expected = EXPECTED[name]
    assert len(corpus) == len(corpus.dictionary) == expected["vocab"]
    for split in d.SPLITS:
        tensor = corpus.split(split)
        assert tensor.dtype == torch.int64 and tensor.dim() == 1
        assert tensor.numel() == expected[split]
    assert int(corpus.valid.max()) < expected["vocab"] and int(corpus.test.max()) < expected["vocab"]


def test_tokenisation_rules(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "train.txt").write_text(" the  cat\tsat \n\nthe café\n", encoding="utf-8")
    (directory / "valid.txt").write_text("new cat\n", encoding="utf-8")
    (directory / "test.txt").write_text("the", encoding="utf-8")  # no trailing newline: still one line
    corpus = d.Corpus(directory)
    assert corpus.dictionary.idx2word == ["the", "cat", "sat", d.EOS, "café", "new"]
    assert corpus.dictionary.word2idx == {w: i for i, w in enumerate(corpus.dictionary.idx2word)}
    assert corpus.train.tolist() == [0, 1, 2, 3, 3, 0, 4, 3]  # blank line -> a single <eos>
    assert corpus.valid.tolist() == [5, 1, 3]
    assert corpus.test.tolist() == [0, 3]
    assert "café" in corpus.dictionary and len(corpus) == 6


# ---------------------------------------------------------------------------------------------------------------
# batchify, get_batch and windows
# ---------------------------------------------------------------------------------------------------------------


def test_batchify_shapes(ptb: d.Corpus, wt2: d.Corpus) -> None:
    cases = [
        (ptb.train, 20, 46_479),
        (ptb.valid, 20, 3_688),
        (ptb.test, 20, 4_121),
        (ptb.valid, 10, 7_376),
        (ptb.test, 1, 82_430),
        (wt2.train, 15, 139_241),
        (wt2.valid, 10, 21_764),
        (wt2.test, 1, 245_569),
    ]
    for data, bsz, rows in cases:
        source = d.batchify(data, bsz)
        assert source.shape == (rows, bsz) and source.is_contiguous()
        # Column j is the j-th contiguous stretch of the corpus.
        for j in (0, bsz - 1):
            assert torch.equal(source[:, j], data[j * rows : (j + 1) * rows])
    assert len(d.fixed_bptt_windows(46_479, 35)) == 1_328


def test_fixed_windows_are_consecutive_and_shifted(ptb: d.Corpus) -> None:
    source = d.batchify(ptb.train, 20)
    batches = list(d.BPTTWindows(source, 35))
    assert len(batches) == len(d.BPTTWindows(source, 35)) == 1_328
    inputs = torch.cat([b.input for b in batches])
    targets = torch.cat([b.target.view(-1, 20) for b in batches])
    assert torch.equal(inputs, source[:-1])  # consecutive, no gap, no overlap
    assert torch.equal(targets, source[1:])  # targets are the inputs shifted by one
    assert {b.input.shape[0] for b in batches[:-1]} == {35}
    assert batches[-1].input.shape == ((46_479 - 1) % 35, 20) == (33, 20)  # last window shorter
    assert all(b.seq_len == 35 for b in batches)
    first = batches[0]
    assert first.input.dtype == first.target.dtype == torch.int64
    assert first.target.shape == (35 * 20,)
    assert torch.equal(first.target, source[1:36].reshape(-1))  # time-major flattening


def test_get_batch_clips_at_the_end() -> None:
    source = d.batchify(torch.arange(40), 4)  # 10 rows
    inp, target = d.get_batch(source, 7, 35)
    assert inp.shape == (2, 4) and torch.equal(target, source[8:10].reshape(-1))
    with pytest.raises(ValueError, match="no window at i=9"):
        d.get_batch(source, 9, 35)


def test_variable_bptt_is_deterministic_per_seed_and_epoch() -> None:
    windows = d.variable_bptt_windows(46_479, 70, d.epoch_rng(141, 3))
    assert windows == d.variable_bptt_windows(46_479, 70, d.epoch_rng(141, 3))
    assert windows != d.variable_bptt_windows(46_479, 70, d.epoch_rng(141, 4))
    assert windows != d.variable_bptt_windows(46_479, 70, d.epoch_rng(142, 3))

    epoch = {"value": 3}
    source = torch.zeros(46_479, 2, dtype=torch.int64)
    dataset = d.BPTTWindows(source, 70, variable=True, seed=141, epoch=lambda: epoch["value"])
    assert dataset.windows() == windows and dataset.num_windows() == len(windows)
    epoch["value"] = 4  # the epoch is read when iteration starts
    assert [b.seq_len for b in dataset] == [s for _, s in dataset.windows(4)]
    with pytest.raises(TypeError, match="num_windows"):
        len(dataset)


def test_variable_bptt_statistics() -> None:
    rows, bptt = 46_479, 70
    lengths, counts = [], []
    for epoch in range(5):
        windows = d.variable_bptt_windows(rows, bptt, d.epoch_rng(0, epoch))
        starts = [i for i, _ in windows]
        assert starts[0] == 0
        assert all(b == a + s for (a, s), b in zip(windows, starts[1:]))  # consecutive
        assert starts[-1] < rows - 2 <= starts[-1] + windows[-1][1]  # loop while i < rows - 2
        lengths += [s for _, s in windows]
        counts.append(len(windows))
    lengths_arr = np.array(lengths)
    assert 67.0 < lengths_arr.mean() < 68.5  # E = 0.95*70 + 0.05*35 - 0.5 (truncation) = 67.75
    assert lengths_arr.min() >= 5
    assert 0.03 < np.mean(lengths_arr < 52) < 0.07  # the bptt/2 branch, taken 5% of the time
    assert all(670 < c < 700 for c in counts)  # about 686 steps per PTB epoch at batch 20

    capped = [s for _, s in d.variable_bptt_windows(rows, bptt, d.epoch_rng(0, 0), max_seq_len=75)]
    assert max(capped) == 75 and min(capped) >= 5
    short = d.variable_bptt_windows(rows, 5, d.epoch_rng(0, 0))
    assert min(s for _, s in short) == 5


# ---------------------------------------------------------------------------------------------------------------
# DDP column split
# ---------------------------------------------------------------------------------------------------------------


def fake_trainer(world_size: int = 1, rank: int = 0, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=epoch)


@pytest.mark.parametrize("variable", [False, True])
def test_ddp_ranks_take_disjoint_covering_column_groups(synthetic: Path, variable: bool) -> None:
    world_size, batch_size = 4, 8
    dm = d.LanguageModelingDataModule(
        "mine", data_dir=str(synthetic), batch_size=batch_size, bptt=6, variable_bptt=variable, seed=3
    )
    full = dm.batchified("train")
    per_rank = []
    for rank in range(world_size):
        dm.trainer = fake_trainer(world_size, rank, epoch=2)
        dm.setup("fit")
        per_rank.append(list(dm.train_dataloader()))
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps on every rank
    assert len(per_rank[0]) == dm.num_train_windows(2)
    for step in range(len(per_rank[0])):
        assert len({batches[step].seq_len for batches in per_rank}) == 1
        inputs = torch.cat([batches[step].input for batches in per_rank], dim=1)
        assert inputs.shape[1] == batch_size
        start = sum(b.input.shape[0] for b in per_rank[0][:step])
        assert torch.equal(inputs, full[start : start + inputs.shape[0]])  # disjoint and covering, in order

    columns = [d.rank_columns(batch_size, world_size, r) for r in range(world_size)]
    covered = sorted(c for s in columns for c in range(s.start, s.stop))
    assert covered == list(range(batch_size))

    dm.trainer = fake_trainer(world_size=3)
    with pytest.raises(ValueError, match="batch_size=8 must be divisible.*world_size=3"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------------------------


def test_datamodule_batches(synthetic: Path) -> None:
    dm = d.LanguageModelingDataModule(
        "mine", data_dir=str(synthetic), batch_size=4, eval_batch_size=3, test_batch_size=1, bptt=7
    )
    dm.prepare_data()
    dm.setup("fit")
    corpus = d.Corpus(synthetic)
    assert dm.vocab_size == len(corpus.dictionary) == 42  # 40 words, <eos>, only_in_valid
    assert torch.equal(dm.corpus.train, corpus.train)

    train = list(dm.train_dataloader())
    assert (
        len(dm.train_dataloader())
        == len(train)
        == dm.num_train_windows()
        == len(d.fixed_bptt_windows(dm.split_rows("train"), 7))
    )
    batch = train[0]
    assert isinstance(batch, d.BPTTBatch)
    inp, target, seq_len = batch
    assert inp.shape == (7, 4) and target.shape == (28,) and seq_len == 7

    for split, loader, bsz in (("valid", dm.val_dataloader(), 3), ("test", dm.test_dataloader(), 1)):
        batches = list(loader)
        source = d.batchify(corpus.split(split), bsz)
        assert dm.split_rows(split) == source.size(0)
        assert len(batches) == len(d.fixed_bptt_windows(source.size(0), 7))
        assert torch.equal(torch.cat([b.input for b in batches]), source[:-1])


class _Recorder(pl.LightningModule):
    """Records what Lightning feeds it: per-epoch training seq_lens and validation batch counts."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 4)
        self.decoder = nn.Linear(4, vocab_size)
        self.seen: dict[int, list[int]] = {}
        self.val_batches: dict[int, int] = {}

    def training_step(self, batch: d.BPTTBatch, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, d.BPTTBatch)
        self.seen.setdefault(self.current_epoch, []).append(batch.seq_len)
        logits = self.decoder(self.embedding(batch.input)).view(-1, self.decoder.out_features)
        return nn.functional.cross_entropy(logits, batch.target)

    def validation_step(self, batch: d.BPTTBatch, batch_idx: int) -> None:
        self.val_batches[self.current_epoch] = self.val_batches.get(self.current_epoch, 0) + 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("variable", [False, True])
def test_trainer_runs_every_window_of_every_epoch(tmp_path: Path, variable: bool) -> None:
    """Lightning must see each epoch's exact windows (which change per epoch) and validate every epoch."""
    corpus_dir = write_synthetic(tmp_path / "c", train_lines=200)
    dm = d.LanguageModelingDataModule(
        "mine",
        data_dir=str(corpus_dir),
        batch_size=4,
        eval_batch_size=2,
        bptt=8,
        variable_bptt=variable,
        max_seq_len_delta=4 if variable else None,
        seed=5,
    )
    model = _Recorder(dm.vocab_size)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    n_val = len(d.fixed_bptt_windows(dm.split_rows("valid"), 8))
    assert model.val_batches == {0: n_val, 1: n_val, 2: n_val}
    for epoch in range(3):
        expected = [s for _, s in dm.train_dataset().windows(epoch)]
        assert model.seen[epoch] == expected
    if variable:
        assert len({tuple(v) for v in model.seen.values()}) == 3  # a fresh draw every epoch
        assert max(max(v) for v in model.seen.values()) <= 12
