"""Where ``selfish-rnn analyze`` reads a run's topologies: the mask history (units by position) or checkpoints
(units aligned by their activations on the test split, Appendix J), and the distances between two of them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_selfish import analysis
from lightning_selfish.callbacks.history import MaskSnapshot

_CHECKPOINT_EPOCH = re.compile(r"epoch[=_]?(\d+)")


class AnalyzeError(Exception):
    """A run directory that lacks what the requested analysis needs."""


#: Below this fraction of units with distinct partners, a semi-matching has collapsed: its aligned distances
#: compare units with other units' edges.
POOR_MATCHING = 0.5


@dataclass(frozen=True)
class DistanceRow:
    """One part (``"all"`` or a gate) of one tensor compared: the distance and what it is worth."""

    tensor: str
    part: str
    distance: float
    aligned: bool
    chance: float
    by_position: float  # the distance with units paired by position (equal to ``distance`` when not aligned)
    partners: float | None = None  # aligned: the smallest fraction of units with distinct partners it used
    correlation: float | None = None  # aligned: the smallest mean correlation with the partner it used
    poor: tuple[str, ...] = ()  # aligned: what was poor about its matchings, one line per matching


class TopologySource:
    def epochs(self) -> list[int]:
        raise NotImplementedError

    def distance(self, first: int, second: int) -> list[DistanceRow]:
        raise NotImplementedError

    def distance_to(self, other: TopologySource, epoch: int) -> list[DistanceRow]:
        raise NotImplementedError


class HistoryTopologies(TopologySource):
    """Topologies of the bit-packed mask history, compared unit by unit at the same position."""

    def __init__(self, history: dict[int, MaskSnapshot]) -> None:
        self.history = history

    def epochs(self) -> list[int]:
        return sorted(self.history)

    def distance(self, first: int, second: int) -> list[DistanceRow]:
        return _mask_rows(self.history[first], self.history[second])

    def distance_to(self, other: TopologySource, epoch: int) -> list[DistanceRow]:
        assert isinstance(other, HistoryTopologies)
        return _mask_rows(self.history[epoch], other.history[epoch])


def _mask_rows(a: MaskSnapshot, b: MaskSnapshot) -> list[DistanceRow]:
    if set(a.masks) != set(b.masks):
        raise AnalyzeError(f"the runs sparsify different tensors: {sorted(a.masks)} and {sorted(b.masks)}")
    rows = []
    for name, mask in a.masks.items():
        gates = a.gates.get(name)
        chance = analysis.chance_distance(mask, b.masks[name], gates)
        for part, value in analysis.mask_distance(mask, b.masks[name], gates).items():
            rows.append(DistanceRow(name, part, value, False, chance[part], value))
    return rows


class CheckpointTopologies(TopologySource):
    """Topologies and activations of per-epoch checkpoints; units of every ``nn.LSTM`` aligned by activations."""

    def __init__(self, run: Path, max_batches: int, data_from: CheckpointTopologies | None = None) -> None:
        self.run = run
        self.max_batches = max_batches
        self.checkpoints = _checkpoints_by_epoch(run)
        if not self.checkpoints:
            raise AnalyzeError(
                f"--align activations needs a checkpoint per compared epoch in {run / 'checkpoints'} (file names "
                "with epoch<N> or epoch=<N>); train with ModelCheckpoint(every_n_epochs=1, save_top_k=-1), "
                "see docs/analysis.md"
            )
        self._batches = data_from._test_batches() if data_from is not None else None
        self._cache: dict[int, tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor], dict]] = {}

    def epochs(self) -> list[int]:
        return sorted(self.checkpoints)

    def distance(self, first: int, second: int) -> list[DistanceRow]:
        return aligned_rows(self._load(first), self._load(second))

    def distance_to(self, other: TopologySource, epoch: int) -> list[DistanceRow]:
        assert isinstance(other, CheckpointTopologies)
        other._batches = self._test_batches()
        return aligned_rows(self._load(epoch), other._load(epoch))

    def _test_batches(self) -> list[Tensor]:
        if self._batches is None:
            self._batches = _test_batches(self.run, self.max_batches)
        return self._batches

    def _load(self, epoch: int) -> tuple[dict[str, Tensor], dict, dict[str, Tensor], dict]:
        # The two most recently used epochs stay loaded: the reference epoch and the one compared to it.
        entry = self._cache.pop(epoch, None)
        if entry is None:
            entry = _load_checkpoint(self.checkpoints[epoch], self._test_batches())
        self._cache[epoch] = entry
        while len(self._cache) > 2:
            self._cache.pop(next(iter(self._cache)))
        return entry


def _checkpoints_by_epoch(run: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        match = _CHECKPOINT_EPOCH.search(path.stem)
        if match and not path.stem.startswith("last"):
            found.setdefault(int(match.group(1)), path)
    return found


def _test_batches(run: Path, max_batches: int) -> list[Tensor]:
    import yaml

    from lightning_selfish_recipes.data import LanguageModelingDataModule

    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise AnalyzeError(f"--align activations reads the data from the run's config, but {config_path} is missing")
    config = yaml.safe_load(config_path.read_text()) or {}
    data = LanguageModelingDataModule(**(config.get("data") or {}))
    data.prepare_data()
    data.setup("test")
    batches = []
    for k, batch in enumerate(data.test_dataloader()):
        if k >= max_batches:
            break
        batches.append(batch[0])
    return batches


def _load_checkpoint(path: Path, batches: list[Tensor]) -> tuple[dict[str, Tensor], dict, dict[str, Tensor], dict]:
    """Masks, gate layouts, activations per unit group and the tensor -> (row group, column group) map."""
    from lightning_selfish.core.gates import detect_gate_layouts
    from lightning_selfish_recipes.lm import LanguageModel
    from lightning_selfish_recipes.old_names import with_current_class_paths

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("callbacks", {}).get("SelfishSparsityCallback", {})
    if "masks" not in state:
        raise AnalyzeError(f"{path} holds no SelfishSparsityCallback masks: was the run sparse?")
    # a run of an earlier version names its network recipes.models.X: give the current class path instead
    network = with_current_class_paths((checkpoint.get("hyper_parameters") or {}).get("network"))
    model = LanguageModel.load_from_checkpoint(path, map_location="cpu", **({"network": network} if network else {}))
    model.eval()
    gates = detect_gate_layouts(model)
    activations, groups = lstm_unit_activations(model, batches)
    return {n: m.bool() for n, m in state["masks"].items()}, gates, activations, groups


@torch.no_grad()
def lstm_unit_activations(model: nn.Module, batches: list[Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Activations ``(samples, units)`` of every unit group of the ``nn.LSTM`` modules of ``model``'s network.

    Groups are ``<lstm>.input`` (the features fed to the first layer) and ``<lstm>.l<k>`` (layer ``k``'s hidden
    output); each layer is replayed on its own from the module's weights, so the per-layer outputs that a
    multi-layer cuDNN LSTM keeps inside are available. Returns the activations and, per tensor name, the
    (row group, column group) that :func:`lightning_selfish.analysis.topology_distance` aligns it by (None: by
    position). Besides the LSTM tensors, every embedding whose output is a group (its columns are those units:
    the features fed to the first layer) and every linear layer whose input is one (the decoder reading the last
    layer) is aligned: found by comparing, in eval mode, what the module produced or read with each group.
    """
    lstms = {name: module for name, module in model.named_modules() if type(module) is nn.LSTM}
    recorded: dict[str, list[Tensor]] = {}
    groups: dict[str, tuple[str | None, str | None]] = {}
    for name, lstm in lstms.items():
        if lstm.bidirectional or lstm.proj_size:
            continue
        for k in range(lstm.num_layers):
            groups[f"{name}.weight_ih_l{k}"] = (f"{name}.l{k}", f"{name}.input" if k == 0 else f"{name}.l{k - 1}")
            groups[f"{name}.weight_hh_l{k}"] = (f"{name}.l{k}", f"{name}.l{k}")

    def record(name: str, lstm: nn.LSTM):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            hx = args[1] if len(args) > 1 else None
            recorded.setdefault(f"{name}.input", []).append(x.reshape(-1, x.shape[-1]).float())
            for k in range(lstm.num_layers):
                weights = [getattr(lstm, f"{w}_l{k}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                state = None if hx is None else (hx[0][k : k + 1].contiguous(), hx[1][k : k + 1].contiguous())
                if state is None:
                    zeros = x.new_zeros(1, x.shape[1], lstm.hidden_size)
                    state = (zeros, zeros)
                x = torch.lstm(x, state, weights[: 4 if lstm.bias else 2], lstm.bias, 1, 0.0, False, False, False)[0]
                recorded.setdefault(f"{name}.l{k}", []).append(x.reshape(-1, x.shape[-1]).float())

        return hook

    seen: dict[str, list[Tensor]] = {}  # what every embedding produced and every linear layer read

    def watch(name: str, produced: bool):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            value = output if produced else args[0]
            seen.setdefault(name, []).append(value.reshape(-1, value.shape[-1]).float())

        return hook

    handles = [lstm.register_forward_hook(record(name, lstm)) for name, lstm in lstms.items()]
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.Linear)) and isinstance(getattr(module, "weight", None), Tensor):
            handles.append(module.register_forward_hook(watch(name, isinstance(module, nn.Embedding))))
    try:
        network = getattr(model, "network", model)
        hidden = None
        for tokens in batches:
            if hidden is None or _batch_size(hidden) != tokens.shape[1]:
                hidden = network.init_hidden(tokens.shape[1])
            hidden = network(tokens, hidden).hidden
    finally:
        for handle in handles:
            handle.remove()
    activations = {group: torch.cat(chunks) for group, chunks in recorded.items()}
    for name, chunks in seen.items():
        values = torch.cat(chunks)
        group = next(
            (g for g, acts in activations.items() if acts.shape == values.shape and torch.allclose(acts, values)),
            None,
        )
        if group is not None:
            groups[f"{name}.weight"] = (None, group)  # rows: tokens (embedding) or outputs, kept by position
    return activations, groups


def _batch_size(hidden: Any) -> int:
    while not isinstance(hidden, Tensor):
        hidden = hidden[0]
    return hidden.shape[-2]


def aligned_rows(first: tuple, second: tuple) -> list[DistanceRow]:
    masks_a, gates, acts_a, groups = first
    masks_b, _, acts_b, _ = second
    matches: dict[str, tuple[Tensor, Tensor]] = {}
    quality: dict[str, list[tuple[str, dict[str, float]]]] = {}
    for group in acts_a:
        correlation = analysis.correlation_matrix(acts_a[group], acts_b[group])
        forward, backward = analysis.semi_matching(correlation), analysis.semi_matching(correlation.T)
        matches[group] = (forward, backward)
        quality[group] = [
            ("first to second", analysis.match_quality(correlation, forward)),
            ("second to first", analysis.match_quality(correlation.T, backward)),
        ]
    rows = []
    for name, mask in masks_a.items():
        layout = gates.get(name)
        by_position = analysis.mask_distance(mask, masks_b[name], layout)
        used = [g for g in groups.get(name, (None, None)) if g is not None]
        chance = analysis.chance_distance(mask, masks_b[name], layout)
        if used and all(g in matches for g in used):
            row_group, col_group = groups[name]
            distance = analysis.topology_distance(
                mask,
                masks_b[name],
                layout,
                rows_ab=matches[row_group][0] if row_group else None,
                cols_ab=matches[col_group][0] if col_group else None,
                rows_ba=matches[row_group][1] if row_group else None,
                cols_ba=matches[col_group][1] if col_group else None,
            )
            found = [(g, way, q) for g in used for way, q in quality[g]]
            partners = min(q["distinct_fraction"] for _, _, q in found)
            correlation = min(q["mean"] for _, _, q in found)
            poor = tuple(
                f"{g} ({way}): {q['distinct']} of {q['units']} units have distinct partners, mean correlation "
                f"{q['mean']:.2f}"
                for g, way, q in found
                if q["distinct_fraction"] < POOR_MATCHING
            )
            rows += [
                DistanceRow(name, part, value, True, chance[part], by_position[part], partners, correlation, poor)
                for part, value in distance.items()
            ]
        else:
            rows += [DistanceRow(name, part, value, False, chance[part], value) for part, value in by_position.items()]
    return rows
