"""Analysis of masks without Lightning: topology distances, exploration, bit-packing (:mod:`.masks`), the FLOPs
rules (:mod:`.flops`) and the pictures (:mod:`.plots`). ``lightning_selfish.analysis.X`` names the functions of
:mod:`.masks`, as before the layers were folders."""

from lightning_selfish.analysis.masks import (
    CONSTANT_SPREAD,
    CorrelationAccumulator,
    chance_distance,
    correlation_matrix,
    exploration_report,
    gate_sparsity,
    gate_sparsity_markdown,
    magnitude_above,
    mask_distance,
    match_quality,
    pack_mask,
    pack_masks,
    pairwise_edit_distance,
    row_edit_distance,
    semi_matching,
    topology_distance,
    unit_count,
    unit_view,
    unpack_mask,
    unpack_masks,
)

__all__ = [
    "CONSTANT_SPREAD",
    "CorrelationAccumulator",
    "chance_distance",
    "correlation_matrix",
    "exploration_report",
    "gate_sparsity",
    "gate_sparsity_markdown",
    "magnitude_above",
    "match_quality",
    "mask_distance",
    "pack_mask",
    "pack_masks",
    "pairwise_edit_distance",
    "row_edit_distance",
    "semi_matching",
    "topology_distance",
    "unit_count",
    "unit_view",
    "unpack_mask",
    "unpack_masks",
]
