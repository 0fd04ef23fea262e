"""The paper's results (Tables 2, 3, 5, 6, 7, 8 and 9 of Selfish-RNN, ICML 2021) and the command of every cell.

One record per table row: the paper's validation/test perplexity and FLOPs, and, for the rows that can be trained
here, the ``selfish-rnn fit`` command that runs it (a model config composed with a method and an optimizer
overlay). Rows quoted from other papers whose setup the configs do not reproduce (``Dense*``, ``ISS*``) have no
command. ``docs/experiments.md`` shows these commands, ``selfish-rnn results`` fills the tables in from finished
runs (:mod:`lightning_selfish_recipes.tools.matching` decides which run belongs to which row), and
``tests/recipes/test_experiments.py`` checks that every documented command builds the run its row describes.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

__all__ = ["CONFIGS", "MODEL_CONFIGS", "PAPER_ROWS", "TABLES", "PaperRow"]

CONFIGS = "lightning_selfish_recipes/configs"

#: The network class of each model config.
MODEL_CONFIGS: dict[str, str] = {
    "stacked_lstm_ptb": "StackedLSTM",
    "rhn_ptb": "RHN",
    "onlstm_ptb": "ONLSTM",
    "awd_lstm_mos_wt2": "AWDLSTMMoS",
}

TABLES: dict[str, str] = {
    "2": "Table 2: stacked LSTM and RHN on Penn Treebank",
    "3": "Table 3: optimizers and DST methods, stacked LSTM on PTB, sparsity 0.67",
    "5": "Table 5: ablations (test perplexity)",
    "6": "Table 6: cell-gate redistribution variants, stacked LSTM on PTB, sparsity 0.67",
    "7": "Table 7: ON-LSTM on PTB, sparsity 0.55 (mean ± std of 5 runs)",
    "8": "Table 8: AWD-LSTM-MoS on WikiText-2, sparsity 0.55",
}

#: Method overlays (lightning_selfish_recipes/configs/methods/) and the signature method name each one produces.
METHOD_OVERLAYS = {
    "selfish": None,  # the model configs train Selfish-RNN already
    "static": "methods/static.yaml",
    "static_er": "methods/static_er.yaml",
    "set": "methods/set.yaml",
    "dsr": "methods/dsr.yaml",
    "snfs": "methods/snfs.yaml",
    "rigl": "methods/rigl.yaml",
    "gmp": "methods/gmp.yaml",
    "dense": "methods/dense.yaml",
    "no_redistribution": "methods/no_redistribution.yaml",
    "gates_magnitude": None,  # Table 6: --model.sparsity.gate_redistribution magnitude
    "gates_gradient": None,  # Table 6: --model.sparsity.gate_redistribution gradient
}
OPTIMIZER_OVERLAYS = {
    "sntasgd": None,  # the model configs' optimizer
    "ntasgd": "optimizers/ntasgd.yaml",
    "adam": "optimizers/adam.yaml",
    "momentum": "optimizers/momentum.yaml",
}


@dataclass(frozen=True)
class PaperRow:
    """One row of one of the paper's tables, for one model.

    ``method`` is a signature name: a preset name, ``"dense"``, ``"small_dense"``, ``"static_er"`` or
    ``"no_redistribution"``. ``sparsity`` is the run's (None for dense). ``val``/``test`` are the paper's
    perplexities (None where it gives none), ``train_flops``/``test_flops`` Table 9's ratios to dense.
    """

    table: str
    model: str  # a key of MODEL_CONFIGS
    row: str  # the row as the paper labels it
    method: str
    optimizer: str
    sparsity: float | None
    params: str
    val: float | None
    test: float | None
    val_std: float | None = None
    test_std: float | None = None
    train_flops: float | None = None
    test_flops: float | None = None
    quoted: str | None = None  # the paper the numbers are quoted from (not trained by the authors)
    reproduces_quote: bool = False  # a quoted row whose setup the configs reproduce: it has a command
    extra_args: tuple[str, ...] = field(default=())
    repeats: int = 1  # runs the paper's number is the mean of (Table 7: 5)
    note: str = ""  # what a reader must know to compare with this row

    @property
    def trained(self) -> bool:
        """Whether the row has a command: the authors' own rows, and quoted baselines the configs reproduce."""
        return self.quoted is None or self.reproduces_quote

    @property
    def printed_sparsity(self) -> float | None:
        """The sparsity as the paper prints it (two decimals: RHN's 0.528 is printed 0.53); None for dense."""
        return None if self.sparsity is None else round(self.sparsity, 2)

    @property
    def label(self) -> str:
        """``<model>: <row>, sparsity <S>`` (or ``dense``): unique within a table."""
        level = "dense" if self.sparsity is None else f"sparsity {self.printed_sparsity:g}"
        return f"{self.model}: {self.row}, {level}"

    def command_args(self) -> list[str]:
        """The ``selfish-rnn fit`` arguments of this row (after ``fit``)."""
        if not self.trained:
            raise ValueError(f"{self.row} ({self.model}) is quoted from {self.quoted}: there is no command")
        args = ["--config", f"{CONFIGS}/{self.model}.yaml"]
        if self.method == "small_dense":
            args += ["--config", f"{CONFIGS}/small_dense/{self.model}.yaml"]
        elif METHOD_OVERLAYS[self.method] is not None:
            args += ["--config", f"{CONFIGS}/{METHOD_OVERLAYS[self.method]}"]
        if OPTIMIZER_OVERLAYS[self.optimizer] is not None:
            args += ["--config", f"{CONFIGS}/{OPTIMIZER_OVERLAYS[self.optimizer]}"]
        if self.sparsity is not None and self.sparsity != DEFAULT_SPARSITY[self.model]:
            args += ["--model.sparsity.sparsity", f"{self.sparsity:g}"]
        return args + list(self.extra_args)

    def command(self) -> str:
        """The command line as documented (a shell-quoted string)."""
        return "selfish-rnn fit " + " ".join(shlex.quote(a) for a in self.command_args())


DEFAULT_SPARSITY = {"stacked_lstm_ptb": 0.67, "rhn_ptb": 0.528, "onlstm_ptb": 0.55, "awd_lstm_mos_wt2": 0.55}


#: One side of Table 2 (a model): ``(val, test, train FLOPs, inference FLOPs)`` per cell, Table 9's FLOPs.
Cell = tuple[float, float, float, float]


@dataclass(frozen=True)
class Table2Side:
    model: str
    dense_params: str
    quoted_dense: tuple[str, float, float]  # (source, val, test) of the Dense* row
    dense: tuple[float, float]  # Dense (NT-ASGD)
    sparsity: float
    sparse_params: str
    small_dense: Cell
    static_er: Cell
    static_uniform: Cell
    iss: Cell
    adam: dict[str, Cell]  # method -> cell, in the paper's order
    sntasgd: dict[str, Cell]
    second_sparsity: float
    second_params: str
    second_iss: Cell
    second_sntasgd: dict[str, Cell]


ISS_SOURCE = "Wen et al. (2018), ISS"

TABLE2 = (
    Table2Side(
        model="stacked_lstm_ptb",
        dense_params="66.0M",
        quoted_dense=("Zaremba et al. (2014)", 82.57, 78.57),
        dense=(74.51, 72.40),
        sparsity=0.67,
        sparse_params="21.8M",
        small_dense=(88.67, 86.33, 0.33, 0.33),
        static_er=(81.02, 79.30, 0.33, 0.34),
        static_uniform=(80.37, 78.61, 0.33, 0.33),
        iss=(82.59, 78.65, 0.28, 0.20),
        adam={
            "dsr": (89.95, 88.16, 0.38, 0.40),
            "gmp": (89.47, 87.97, 0.63, 0.33),
            "snfs": (88.31, 86.28, 0.63, 0.38),
            "rigl": (88.39, 85.61, 0.33, 0.34),
            "set": (87.30, 85.49, 0.33, 0.34),
            "selfish": (85.70, 82.85, 0.33, 0.33),
        },
        sntasgd={
            "rigl": (78.31, 75.90, 0.33, 0.34),
            "gmp": (76.78, 74.84, 0.63, 0.33),
            "selfish": (73.76, 71.65, 0.33, 0.33),
        },
        second_sparsity=0.62,
        second_params="25.2M",
        second_iss=(80.24, 76.03, 0.32, 0.23),
        second_sntasgd={
            "rigl": (77.16, 74.76, 0.38, 0.39),
            "gmp": (74.86, 73.03, 0.63, 0.38),
            "selfish": (73.50, 71.42, 0.38, 0.38),
        },
    ),
    # RHN: the paper's 0.53 is the configs' 0.528 (density 0.472; docs/models.md#parameter-counts)
    Table2Side(
        model="rhn_ptb",
        dense_params="23.5M",
        quoted_dense=("Zilly et al. (2017)", 67.90, 65.40),
        dense=(63.44, 61.84),
        sparsity=0.528,
        sparse_params="11.1M",
        small_dense=(70.10, 68.40, 0.47, 0.47),
        static_er=(75.74, 73.21, 0.47, 0.47),
        static_uniform=(74.11, 71.83, 0.47, 0.47),
        iss=(68.10, 65.40, 0.50, 0.47),
        adam={
            "dsr": (65.38, 63.19, 0.47, 0.47),
            "gmp": (63.21, 61.55, 0.62, 0.47),
            "snfs": (74.02, 70.99, 0.63, 0.45),
            "rigl": (67.43, 64.41, 0.47, 0.47),
            "set": (63.66, 61.08, 0.47, 0.47),
            "selfish": (63.28, 60.75, 0.47, 0.47),
        },
        sntasgd={
            "rigl": (64.82, 62.47, 0.47, 0.47),
            "gmp": (65.63, 63.96, 0.62, 0.47),
            "selfish": (62.10, 60.35, 0.47, 0.47),
        },
        second_sparsity=0.68,
        second_params="7.6M",
        second_iss=(70.30, 67.70, 0.34, 0.32),
        second_sntasgd={
            "rigl": (69.32, 66.64, 0.32, 0.32),
            "gmp": (66.61, 64.98, 0.51, 0.32),
            "selfish": (66.35, 64.03, 0.32, 0.32),
        },
    ),
)
"""Table 2 (with Table 9's FLOPs): both sides have the same rows, built by :func:`_table2_rows`."""


def _table2_rows(side: Table2Side) -> list[PaperRow]:
    """The rows of one side of Table 2, in the paper's order."""

    def row(label: str, method: str, optimizer: str, sparsity: float | None, params: str, cell, **kw) -> PaperRow:
        val, test, *flops = cell
        train, inference = flops or (1, 1)
        return PaperRow(
            "2", side.model, label, method, optimizer, sparsity, params, val, test,
            train_flops=train, test_flops=inference, **kw,
        )  # fmt: skip

    source, *quoted = side.quoted_dense
    s, params = side.sparsity, side.sparse_params
    rows = [
        row("Dense*", "dense", "sgd", None, side.dense_params, quoted, quoted=source),
        row("Dense (NT-ASGD)", "dense", "ntasgd", None, side.dense_params, side.dense),
        row("Small Dense (NT-ASGD)", "small_dense", "ntasgd", None, params, side.small_dense),
        row("Static-ER (SNT-ASGD)", "static_er", "sntasgd", s, params, side.static_er),
        row("Static-Uniform (SNT-ASGD)", "static", "sntasgd", s, params, side.static_uniform),
        row("ISS*", "iss", "-", s, params, side.iss, quoted=ISS_SOURCE),
    ]
    rows += [row(f"{LABELS[m]} (Adam)", m, "adam", s, params, cell) for m, cell in side.adam.items()]
    rows += [row(f"{LABELS[m]} (SNT-ASGD)", m, "sntasgd", s, params, cell) for m, cell in side.sntasgd.items()]
    s, params = side.second_sparsity, side.second_params
    rows.append(row("ISS*", "iss", "-", s, params, side.second_iss, quoted=ISS_SOURCE))
    rows += [row(f"{LABELS[m]} (SNT-ASGD)", m, "sntasgd", s, params, c) for m, c in side.second_sntasgd.items()]
    return rows


def _rows() -> list[PaperRow]:
    rows: list[PaperRow] = [row for side in TABLE2 for row in _table2_rows(side)]

    def add(table, model, row, method, optimizer, sparsity, params, val, test, **kw) -> None:
        rows.append(PaperRow(table, model, row, method, optimizer, sparsity, params, val, test, **kw))

    lstm, rhn = "stacked_lstm_ptb", "rhn_ptb"
    zaremba = TABLE2[0].quoted_dense[0]
    # ---- Table 3: optimizers x DST methods, stacked LSTM at 0.67
    s = 0.67
    add("3", lstm, "Dense", "dense", "sgd", None, "66.0M", 82.57, 78.57, quoted=zaremba)
    for optimizer, label, entries in (
        (
            "adam",
            "Adam",
            (
                ("dsr", 89.95, 88.16),
                ("snfs", 88.31, 86.28),
                ("rigl", 88.39, 85.61),
                ("set", 87.30, 85.49),
                ("selfish", 85.70, 82.85),
            ),
        ),
        (
            "momentum",
            "SGD with momentum",
            (
                ("snfs", 90.09, 87.98),
                ("set", 85.73, 82.52),
                ("rigl", 84.78, 80.81),
                ("dsr", 82.89, 80.09),
                ("selfish", 82.48, 79.69),
            ),
        ),
        (
            "sntasgd",
            "SNT-ASGD",
            (
                ("snfs", 82.11, 79.50),
                ("rigl", 78.31, 75.90),
                ("set", 76.78, 74.84),
                ("selfish", 73.76, 71.65),
                ("dsr", 72.30, 70.76),
            ),
        ),
    ):
        for method, val, test in entries:
            note = TABLE3_SET_NOTE if (method, optimizer) == ("set", "sntasgd") else ""
            add("3", lstm, f"{LABELS[method]} ({label})", method, optimizer, s, "21.8M", val, test, note=note)

    # ---- Table 5: ablations (test perplexity only)
    onlstm_note = (
        "the paper's ON-LSTM ablation trains as Table 7's 1000-epoch rows (one restart at epoch 500: the same "
        "command); its 55.68 is one run (which one, the paper does not say), below Table 7's mean of five runs "
        "of the same command (56.31 ± 0.10): a run is compared with both as printed"
    )
    for model, full, no_redistribution, standard in (
        (lstm, 71.65, 72.89, 73.74),
        (rhn, 60.35, 60.26, 69.70),
        ("onlstm_ptb", 55.68, 57.48, 69.28),
        ("awd_lstm_mos_wt2", 63.05, 65.27, 71.65),
    ):
        s = DEFAULT_SPARSITY[model]
        note = onlstm_note if model == "onlstm_ptb" else ""
        add("5", model, "Selfish-RNN", "selfish", "sntasgd", s, "", None, full, note=note)
        add("5", model, "w/o cell gate redistribution", "no_redistribution", "sntasgd", s, "", None, no_redistribution)
        add("5", model, "w/o Sparse NT-ASGD", "selfish", "ntasgd", s, "", None, standard)

    # ---- Table 6: how a tensor's regrowth is shared over its gates (stacked LSTM, SNT-ASGD, 0.67)
    for mode, label, val, test in (
        ("magnitude", "Mean of the magnitude of nonzero weights", 74.04, 72.40),
        ("gradient", "Mean of the gradient magnitude of nonzero weights", 74.54, 72.31),
    ):
        extra = ("--model.sparsity.gate_redistribution", mode)
        add("6", lstm, label, f"gates_{mode}", "sntasgd", 0.67, "21.8M", val, test, extra_args=extra)
    add("6", lstm, "Ours (joint ranking)", "selfish", "sntasgd", 0.67, "21.8M", 73.76, 71.65)

    # ---- Table 7: ON-LSTM, 0.55, mean ± std of five runs (1300 epochs: a second averaging restart at 1000)
    on, s = "onlstm_ptb", 0.55
    e1300 = ("--trainer.max_epochs", "1300", "--model.restart_at_epochs", "[500, 1000]")
    for label, method, optimizer, sparsity, params, val, vs, test, ts, extra in (
        ("Dense1000 (NT-ASGD)", "dense", "ntasgd", None, "25M", 58.29, 0.10, 56.17, 0.12, ()),
        ("Dense1300 (NT-ASGD)", "dense", "ntasgd", None, "25M", 58.55, 0.11, 56.28, 0.19, e1300),
        ("SET (Adam)", "set", "adam", s, "11.3M", 65.90, 0.08, 63.56, 0.14, ()),
        ("DSR (Adam)", "dsr", "adam", s, "11.3M", 65.22, 0.07, 62.55, 0.06, ()),
        ("SNFS (Adam)", "snfs", "adam", s, "11.3M", 68.00, 0.10, 65.52, 0.15, ()),
        ("RigL (Adam)", "rigl", "adam", s, "11.3M", 64.41, 0.05, 62.01, 0.13, ()),
        ("RigL1000 (ASGD)", "rigl", "sntasgd", s, "11.3M", 59.17, 0.08, 57.23, 0.09, ()),
        ("RigL1300 (ASGD)", "rigl", "sntasgd", s, "11.3M", 59.10, 0.05, 57.44, 0.15, e1300),
        ("Selfish-RNN1000 (ASGD)", "selfish", "sntasgd", s, "11.3M", 58.17, 0.06, 56.31, 0.10, ()),
        ("Selfish-RNN1300 (ASGD)", "selfish", "sntasgd", s, "11.3M", 57.67, 0.03, 55.82, 0.11, e1300),
    ):
        note = onlstm_note if label == "Selfish-RNN1000 (ASGD)" else ""
        add(
            "7", on, label, method, optimizer, sparsity, params, val, test,
            val_std=vs, test_std=ts, extra_args=extra, repeats=5, note=note,
        )  # fmt: skip

    # ---- Table 8: AWD-LSTM-MoS, 0.55; the dense baseline is Yang et al.'s, which the MoS config reproduces
    mos = "awd_lstm_mos_wt2"
    yang = "Yang et al. (2018)"
    add("8", mos, "Dense (NT-ASGD)", "dense", "ntasgd", None, "35M", 66.01, 63.33, quoted=yang, reproduces_quote=True)
    for method, val, test in (
        ("set", 72.82, 69.61),
        ("dsr", 69.95, 66.93),
        ("snfs", 79.97, 76.18),
        ("rigl", 71.36, 68.52),
    ):
        add("8", mos, f"{LABELS[method]} (Adam)", method, "adam", s, "15.6M", val, test)
    add("8", mos, "RigL (ASGD)", "rigl", "sntasgd", s, "15.6M", 68.84, 65.18)
    add("8", mos, "Selfish-RNN (ASGD)", "selfish", "sntasgd", s, "15.6M", 65.96, 63.05)
    return rows


TABLE3_SET_NOTE = "Table 3 prints for SET (SNT-ASGD) the numbers Table 2 prints for GMP (SNT-ASGD); kept as printed"

LABELS = {"dsr": "DSR", "snfs": "SNFS", "rigl": "RigL", "set": "SET", "selfish": "Selfish-RNN", "gmp": "GMP"}

PAPER_ROWS: list[PaperRow] = _rows()
"""Every row of Tables 2, 3, 5, 6, 7 and 8 (with Table 9's FLOPs on the Table 2 rows), in the paper's order."""
