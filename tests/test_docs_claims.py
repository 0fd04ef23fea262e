"""What the README and docs/ state as fact and a reader acts on: how to install the CPU build of torch, one range
for the quickstart's perplexity, the CPU each performance figure was measured on, and snippets that run as
printed (without the warnings they are meant to avoid or silence)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}


def section(text: str, heading: str) -> str:
    """The body of the section under ``heading`` (a whole heading line), up to the next heading of its level or
    above."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(rf"^#{{1,{level}}} ", text[start:], re.M)
    return text[start : start + following.start()] if following else text[start:]


def test_the_readme_says_how_to_get_the_cpu_build_of_torch() -> None:
    assert "picks the CPU build" not in README
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README


def test_the_quickstart_perplexity_is_one_range_and_every_quoted_figure_is_in_it() -> None:
    why = section(DOCS["recipes.md"], "### Why the perplexity differs from run to run")
    low, high = map(float, re.search(r"from (\d+\.\d) to (\d+\.\d) after the one epoch", why).groups())
    quoted = [float(x) for x in re.findall(r"\b(\d{3}\.\d+)\b", why.split("Two things")[0])]
    assert len(quoted) >= 4 and all(low <= x <= high for x in quoted), quoted
    readme = re.search(r"validation perplexity between (\d+) and (\d+): our runs gave (\d+\.\d) to (\d+\.\d)", README)
    assert readme is not None and (float(readme[3]), float(readme[4])) == (low, high)
    quickstart = section(DOCS["recipes.md"], "## The quickstart")
    rows = [line for line in quickstart.splitlines() if line.startswith(("| 1 |", "| 2 |"))]  # runs by threads
    table = [float(m[1]) for row in rows if (m := re.search(r"\| (\d{3}\.\d+) /[^|]*\|$", row))]
    table.append(float(re.search(r"\| validation perplexity after the epoch \| \*\*(\d+\.\d+)\*\*", quickstart)[1]))
    assert len(table) >= 4 and all(x in quoted for x in table), (table, quoted)


def test_every_measured_cpu_figure_names_its_cpu_or_says_it_was_not_recorded() -> None:
    # The sparse-inference section has its own owner and machine line (docs/performance.md#sparse-inference).
    text = DOCS["performance.md"].split("\n## Sparse inference\n")[0]
    lines = [line for line in text.splitlines() if line.startswith(("Machine:", "| CPU"))]
    assert len(lines) >= 6
    for line in lines:
        assert re.search(r"Xeon|EPYC|not recorded", line), line
    assert "not all the same CPU" in text


def test_the_documented_onednn_switch_runs_without_torchs_tf32_warning() -> None:
    """``torch.backends.mkldnn.flags(enabled=False)`` sets oneDNN's TF32 flag too, and torch 2.13 warns on every CPU
    build that TF32 on oneDNN is for Intel GPUs; the switch the docs give must not."""
    snippets = {m for text in DOCS.values() for m in re.findall(r"`(torch\.backends\.mkldnn\.flags\([^`]*\))`", text)}
    assert snippets, "the docs give a way to turn oneDNN off"
    for snippet in snippets:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with eval(snippet, {"torch": torch}):
                assert not torch.backends.mkldnn.enabled
        assert torch.backends.mkldnn.enabled
        assert not [str(w.message) for w in caught], (snippet, [str(w.message) for w in caught])


USER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import TinyLM, token_loader
import pytorch_lightning as pl
from lightning_selfish import SelfishSparsityCallback

trainer = pl.Trainer(max_epochs=1, callbacks=[SelfishSparsityCallback(sparsity=0.5)], enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir={root!r})
trainer.fit(TinyLM(), token_loader())
"""


def test_the_lightning_messages_the_docs_name_come_from_lightning_and_their_snippet_silences_them(
    tmp_path: Path,
) -> None:
    """A script of one's own with the callback: Lightning's tips and its LeafSpec warning, which docs/callback.md
    names and attributes to Lightning, show; with the docs' snippet first, they do not."""
    block = section(DOCS["callback.md"], "## Messages that come from Lightning")
    snippet = re.search(r"```python\n(.*?)```", block, re.S)[1]
    script = USER_SCRIPT.format(tests=str(ROOT / "tests"), root=str(tmp_path))
    outputs = {}
    for name, code in (("plain", script), ("silenced", snippet + script)):
        (tmp_path / f"{name}.py").write_text(code)
        result = subprocess.run(
            [sys.executable, str(tmp_path / f"{name}.py")],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr
        outputs[name] = result.stdout + result.stderr
    for message in ("💡 Tip: For seamless cloud logging", "💡 Tip: For seamless cloud uploads", "LeafSpec"):
        assert message in outputs["plain"] and message in block, message
        assert message not in outputs["silenced"], (message, outputs["silenced"])
    assert "`Trainer.fit` stopped" in outputs["silenced"], "the snippet silences only those"
