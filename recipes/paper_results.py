"""The paper's results (Tables 2, 3, 5, 6, 7, 8 and 9 of Selfish-RNN, ICML 2021) and the command of every cell.

One record per table row: the paper's validation/test perplexity and FLOPs, and, for the rows the paper trained
itself, the ``selfish-rnn fit`` command that runs it (a model config composed with a method and an optimizer
overlay). Rows quoted from other papers (``Dense*``, ``ISS*``) have no command. ``docs/experiments.md`` shows these
commands, ``selfish-rnn results`` fills the tables in from finished runs, and ``tests/recipes/test_experiments.py``
checks that every documented command builds the run its row describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODEL_CONFIGS", "PAPER_ROWS", "TABLES", "PaperRow", "signature_of_config"]

CONFIGS = "recipes/configs"

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

#: Method overlays (recipes/configs/methods/) and the signature method name each one produces.
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
    quoted: str | None = None  # the paper the row is quoted from (no command: not trained by the authors)
    epochs: int | None = None  # when not the model config's
    extra_args: tuple[str, ...] = field(default=())

    @property
    def trained(self) -> bool:
        return self.quoted is None

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
        import shlex

        return "selfish-rnn fit " + " ".join(shlex.quote(a) for a in self.command_args())

    def signature(self) -> tuple[Any, ...]:
        """What identifies a run of this row: (model, method, optimizer, sparsity, averaging restarts).

        The epochs are not part of it (a running or shortened run still belongs to its row); the 1300-epoch rows of
        Table 7 differ from the 1000-epoch ones by their second restart.
        """
        restarts = (500, 1000) if self.epochs == 1300 else (500,) if self.model == "onlstm_ptb" else ()
        return (self.model, self.method, self.optimizer, self.sparsity, restarts)


DEFAULT_SPARSITY = {"stacked_lstm_ptb": 0.67, "rhn_ptb": 0.528, "onlstm_ptb": 0.55, "awd_lstm_mos_wt2": 0.55}


def signature_of_config(config: dict[str, Any]) -> tuple[Any, ...] | None:
    """The signature (see :meth:`PaperRow.signature`) of a run from its saved ``config.yaml`` (a plain dict)."""
    model = config.get("model") or {}
    network = model.get("network") or {}
    class_name = str(network.get("class_path", "")).rsplit(".", 1)[-1]
    matches = [name for name, cls in MODEL_CONFIGS.items() if cls == class_name]
    if not matches:
        return None
    name = matches[0]
    group = model.get("sparsity")  # SelfishSparsityCallback's arguments (model.sparsity.*), or None: dense
    sparse = group if isinstance(group, dict) else {}
    sparsity = sparse.get("sparsity")
    method = str(sparse.get("method") or "selfish")
    if sparsity is None:
        # the small_dense/ overlays log under "<model>_small_dense": a narrower debugging run stays "dense"
        method = "small_dense" if "small_dense" in _logger_name(config) else "dense"
    elif method == "static" and sparse.get("init") == "er":
        method = "static_er"
    elif method == "selfish" and sparse.get("gate_redistribution") in (False, "none"):
        method = "no_redistribution"
    elif method == "selfish" and sparse.get("gate_redistribution") in ("magnitude", "gradient"):
        method = f"gates_{sparse['gate_redistribution']}"
    optimizer = str(model.get("optimizer") or "sntasgd")
    restarts = tuple(int(epoch) for epoch in model.get("restart_at_epochs") or ())
    return (name, method, optimizer, None if sparsity is None else float(sparsity), restarts)


def _logger_name(config: dict[str, Any]) -> str:
    logger = (config.get("trainer") or {}).get("logger")
    if isinstance(logger, dict):
        return str((logger.get("init_args") or {}).get("name") or "")
    return ""


def _rows() -> list[PaperRow]:
    rows: list[PaperRow] = []

    def add(table, model, row, method, optimizer, sparsity, params, val, test, **kw) -> None:
        rows.append(PaperRow(table, model, row, method, optimizer, sparsity, params, val, test, **kw))

    # ---- Table 2 (and Table 9's FLOPs): stacked LSTM, left side
    lstm, rhn = "stacked_lstm_ptb", "rhn_ptb"
    zaremba, wen = "Zaremba et al. (2014)", "Wen et al. (2018), ISS"
    add("2", lstm, "Dense*", "dense", "sgd", None, "66.0M", 82.57, 78.57, train_flops=1, test_flops=1, quoted=zaremba)
    add("2", lstm, "Dense (NT-ASGD)", "dense", "ntasgd", None, "66.0M", 74.51, 72.40, train_flops=1, test_flops=1)
    s = 0.67
    add(
        "2",
        lstm,
        "Small Dense (NT-ASGD)",
        "small_dense",
        "ntasgd",
        None,
        "21.8M",
        88.67,
        86.33,
        train_flops=0.33,
        test_flops=0.33,
    )
    add(
        "2",
        lstm,
        "Static-ER (SNT-ASGD)",
        "static_er",
        "sntasgd",
        s,
        "21.8M",
        81.02,
        79.30,
        train_flops=0.33,
        test_flops=0.34,
    )
    add(
        "2",
        lstm,
        "Static-Uniform (SNT-ASGD)",
        "static",
        "sntasgd",
        s,
        "21.8M",
        80.37,
        78.61,
        train_flops=0.33,
        test_flops=0.33,
    )
    add("2", lstm, "ISS*", "iss", "-", s, "21.8M", 82.59, 78.65, train_flops=0.28, test_flops=0.20, quoted=wen)
    for method, label, val, test, tf, sf in (
        ("dsr", "DSR", 89.95, 88.16, 0.38, 0.40),
        ("gmp", "GMP", 89.47, 87.97, 0.63, 0.33),
        ("snfs", "SNFS", 88.31, 86.28, 0.63, 0.38),
        ("rigl", "RigL", 88.39, 85.61, 0.33, 0.34),
        ("set", "SET", 87.30, 85.49, 0.33, 0.34),
        ("selfish", "Selfish-RNN", 85.70, 82.85, 0.33, 0.33),
    ):
        add("2", lstm, f"{label} (Adam)", method, "adam", s, "21.8M", val, test, train_flops=tf, test_flops=sf)
    for method, label, val, test, tf, sf in (
        ("rigl", "RigL", 78.31, 75.90, 0.33, 0.34),
        ("gmp", "GMP", 76.78, 74.84, 0.63, 0.33),
        ("selfish", "Selfish-RNN", 73.76, 71.65, 0.33, 0.33),
    ):
        add("2", lstm, f"{label} (SNT-ASGD)", method, "sntasgd", s, "21.8M", val, test, train_flops=tf, test_flops=sf)
    s = 0.62
    add("2", lstm, "ISS*", "iss", "-", s, "25.2M", 80.24, 76.03, train_flops=0.32, test_flops=0.23, quoted=wen)
    for method, label, val, test, tf, sf in (
        ("rigl", "RigL", 77.16, 74.76, 0.38, 0.39),
        ("gmp", "GMP", 74.86, 73.03, 0.63, 0.38),
        ("selfish", "Selfish-RNN", 73.50, 71.42, 0.38, 0.38),
    ):
        add("2", lstm, f"{label} (SNT-ASGD)", method, "sntasgd", s, "25.2M", val, test, train_flops=tf, test_flops=sf)

    # ---- Table 2: RHN, right side (sparsity 0.53 is the configs' 0.528: density 0.472;
    # docs/models.md#parameter-counts)
    zilly = "Zilly et al. (2017)"
    add("2", rhn, "Dense*", "dense", "sgd", None, "23.5M", 67.90, 65.40, train_flops=1, test_flops=1, quoted=zilly)
    add("2", rhn, "Dense (NT-ASGD)", "dense", "ntasgd", None, "23.5M", 63.44, 61.84, train_flops=1, test_flops=1)
    s = 0.528
    add(
        "2",
        rhn,
        "Small Dense (NT-ASGD)",
        "small_dense",
        "ntasgd",
        None,
        "11.1M",
        70.10,
        68.40,
        train_flops=0.47,
        test_flops=0.47,
    )
    add(
        "2",
        rhn,
        "Static-ER (SNT-ASGD)",
        "static_er",
        "sntasgd",
        s,
        "11.1M",
        75.74,
        73.21,
        train_flops=0.47,
        test_flops=0.47,
    )
    add(
        "2",
        rhn,
        "Static-Uniform (SNT-ASGD)",
        "static",
        "sntasgd",
        s,
        "11.1M",
        74.11,
        71.83,
        train_flops=0.47,
        test_flops=0.47,
    )
    add("2", rhn, "ISS*", "iss", "-", s, "11.1M", 68.10, 65.40, train_flops=0.50, test_flops=0.47, quoted=wen)
    for method, label, val, test, tf, sf in (
        ("dsr", "DSR", 65.38, 63.19, 0.47, 0.47),
        ("gmp", "GMP", 63.21, 61.55, 0.62, 0.47),
        ("snfs", "SNFS", 74.02, 70.99, 0.63, 0.45),
        ("rigl", "RigL", 67.43, 64.41, 0.47, 0.47),
        ("set", "SET", 63.66, 61.08, 0.47, 0.47),
        ("selfish", "Selfish-RNN", 63.28, 60.75, 0.47, 0.47),
    ):
        add("2", rhn, f"{label} (Adam)", method, "adam", s, "11.1M", val, test, train_flops=tf, test_flops=sf)
    for method, label, val, test, tf, sf in (
        ("rigl", "RigL", 64.82, 62.47, 0.47, 0.47),
        ("gmp", "GMP", 65.63, 63.96, 0.62, 0.47),
        ("selfish", "Selfish-RNN", 62.10, 60.35, 0.47, 0.47),
    ):
        add("2", rhn, f"{label} (SNT-ASGD)", method, "sntasgd", s, "11.1M", val, test, train_flops=tf, test_flops=sf)
    s = 0.68
    add("2", rhn, "ISS*", "iss", "-", s, "7.6M", 70.30, 67.70, train_flops=0.34, test_flops=0.32, quoted=wen)
    for method, label, val, test, tf, sf in (
        ("rigl", "RigL", 69.32, 66.64, 0.32, 0.32),
        ("gmp", "GMP", 66.61, 64.98, 0.51, 0.32),
        ("selfish", "Selfish-RNN", 66.35, 64.03, 0.32, 0.32),
    ):
        add("2", rhn, f"{label} (SNT-ASGD)", method, "sntasgd", s, "7.6M", val, test, train_flops=tf, test_flops=sf)

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
            add("3", lstm, f"{LABELS[method]} ({label})", method, optimizer, s, "21.8M", val, test)

    # ---- Table 5: ablations (test perplexity only)
    for model, full, no_redistribution, standard in (
        (lstm, 71.65, 72.89, 73.74),
        (rhn, 60.35, 60.26, 69.70),
        ("onlstm_ptb", 55.68, 57.48, 69.28),
        ("awd_lstm_mos_wt2", 63.05, 65.27, 71.65),
    ):
        s = DEFAULT_SPARSITY[model]
        add("5", model, "Selfish-RNN", "selfish", "sntasgd", s, "", None, full)
        add("5", model, "w/o cell gate redistribution", "no_redistribution", "sntasgd", s, "", None, no_redistribution)
        add("5", model, "w/o Sparse NT-ASGD", "selfish", "ntasgd", s, "", None, standard)

    # ---- Table 6: how a tensor's regrowth is shared over its gates (stacked LSTM, SNT-ASGD, 0.67)
    for method, label, val, test in (
        ("gates_magnitude", "Mean of the magnitude of nonzero weights", 74.04, 72.40),
        ("gates_gradient", "Mean of the gradient magnitude of nonzero weights", 74.54, 72.31),
    ):
        gate_mode = method.removeprefix("gates_")
        add(
            "6",
            lstm,
            label,
            method,
            "sntasgd",
            0.67,
            "21.8M",
            val,
            test,
            extra_args=("--model.sparsity.gate_redistribution", gate_mode),
        )
    add("6", lstm, "Ours (joint ranking)", "selfish", "sntasgd", 0.67, "21.8M", 73.76, 71.65)

    # ---- Table 7: ON-LSTM, 0.55 (1300 epochs: a second averaging restart at epoch 1000)
    on, s = "onlstm_ptb", 0.55
    e1300 = ("--trainer.max_epochs", "1300", "--model.restart_at_epochs", "[500, 1000]")
    add("7", on, "Dense1000 (NT-ASGD)", "dense", "ntasgd", None, "25M", 58.29, 56.17, val_std=0.10, test_std=0.12)
    add(
        "7",
        on,
        "Dense1300 (NT-ASGD)",
        "dense",
        "ntasgd",
        None,
        "25M",
        58.55,
        56.28,
        val_std=0.11,
        test_std=0.19,
        epochs=1300,
        extra_args=e1300,
    )
    for method, val, test, vs, ts in (
        ("set", 65.90, 63.56, 0.08, 0.14),
        ("dsr", 65.22, 62.55, 0.07, 0.06),
        ("snfs", 68.00, 65.52, 0.10, 0.15),
        ("rigl", 64.41, 62.01, 0.05, 0.13),
    ):
        add("7", on, f"{LABELS[method]} (Adam)", method, "adam", s, "11.3M", val, test, val_std=vs, test_std=ts)
    add("7", on, "RigL1000 (ASGD)", "rigl", "sntasgd", s, "11.3M", 59.17, 57.23, val_std=0.08, test_std=0.09)
    add(
        "7",
        on,
        "RigL1300 (ASGD)",
        "rigl",
        "sntasgd",
        s,
        "11.3M",
        59.10,
        57.44,
        val_std=0.05,
        test_std=0.15,
        epochs=1300,
        extra_args=e1300,
    )
    add("7", on, "Selfish-RNN1000 (ASGD)", "selfish", "sntasgd", s, "11.3M", 58.17, 56.31, val_std=0.06, test_std=0.10)
    add(
        "7",
        on,
        "Selfish-RNN1300 (ASGD)",
        "selfish",
        "sntasgd",
        s,
        "11.3M",
        57.67,
        55.82,
        val_std=0.03,
        test_std=0.11,
        epochs=1300,
        extra_args=e1300,
    )

    # ---- Table 8: AWD-LSTM-MoS, 0.55
    mos = "awd_lstm_mos_wt2"
    add("8", mos, "Dense (NT-ASGD)", "dense", "ntasgd", None, "35M", 66.01, 63.33)
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


LABELS = {"dsr": "DSR", "snfs": "SNFS", "rigl": "RigL", "set": "SET", "selfish": "Selfish-RNN", "gmp": "GMP"}

PAPER_ROWS: list[PaperRow] = _rows()
"""Every row of Tables 2, 3, 5, 6, 7 and 8 (with Table 9's FLOPs on the Table 2 rows), in the paper's order."""
