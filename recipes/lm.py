"""``LanguageModel``: the training loop of the Selfish-RNN recipes as one LightningModule.

It wraps any network with the interface of :mod:`recipes.models` (``init_hidden(B)`` and
``forward(input (T, B), hidden) -> LMOutput(log_probs, hidden, ar, tar)``) and reproduces the loop the four
reference codebases share (MODELS.md sections 1.4, 1.5, 2, 7 and 10):

* the hidden state is carried from window to window, detached each step (truncated BPTT), and zeroed at the start
  of every training epoch and of every evaluation pass;
* loss = cross-entropy + AR + TAR (the network's ``alpha``/``beta``, 0 when it has none);
* the dense gradient is clipped to global norm 0.25 before the step, and the sparsity callback re-zeroes the
  masked weights after it (the authors' order);
* variable-length BPTT scales the learning rate by ``seq_len / bptt`` for that step only;
* perplexity is ``exp`` of the token-weighted mean cross-entropy over the whole split;
* optimizers of Table 4: SNT-ASGD (default), standard NT-ASGD, plain SGD, momentum SGD and Adam (the last two with
  ReduceLROnPlateau on ``val_loss``).

The callbacks a run needs come from :meth:`LanguageModel.configure_callbacks`, so the module alone decides them
from its arguments: ``SelfishSparsityCallback`` when ``sparsity`` is given, ``NonMonotonicTrigger`` for the
averaged-SGD optimizers, and a ``ModelCheckpoint`` that keeps the best validation model.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn

from lightning_selfish.callback import SelfishSparsityCallback
from lightning_selfish.optim_state import MaskUpdate
from lightning_selfish.sntasgd import SNTASGD
from lightning_selfish.trigger import NonMonotonicTrigger
from recipes.metrics import TokenWeightedCrossEntropy

OptimizerName = Literal["sntasgd", "ntasgd", "sgd", "momentum", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sntasgd", "ntasgd", "sgd", "momentum", "adam")
AVERAGING_OPTIMIZERS: tuple[str, ...] = ("sntasgd", "ntasgd")

#: Table 4's learning-rate drops "(A x, B)": divide by A after B epochs without improvement of ``val_loss``.
PLATEAU_DEFAULTS: dict[str, tuple[float, int]] = {"adam": (0.5, 2), "momentum": (1.0 / 1.33, 1)}


class MaskBlindNTASGD(SNTASGD):
    """Standard NT-ASGD on a sparse model: the ablation "without SNT-ASGD" (Table 5).

    Every weight is averaged over the whole averaging phase, whatever its lifetime. The sparsity engine still
    multiplies the average by the mask after every step (it does so for every optimizer state tensor), so the
    averaged model has exactly the current topology, but a weight grown after the trigger has been zero for most
    of the window and its average stays near zero: the failure mode SNT-ASGD removes. On a dense model this is
    identical to :class:`~lightning_selfish.sntasgd.SNTASGD`.
    """

    #: Unlike SNT-ASGD, the step does write averages at inactive positions: the engine re-zeroes them.
    keeps_inactive_state_zero = False

    def on_mask_update(self, param: Tensor, update: MaskUpdate) -> None:
        """Ignore topology changes: the average of every tensor is the dense running mean since the trigger."""


class LanguageModel(pl.LightningModule):
    r"""A stateful RNN language model trained as in Selfish-RNN, dense or sparse.

    Args:
        network: the language model (e.g. :class:`recipes.models.StackedLSTM`); see the module docstring for the
            interface. Its ``alpha``/``beta`` attributes weight AR/TAR, its ``sparsity_exclude`` patterns (names
            as in ``network.named_parameters()``) stay dense.
        lr: learning rate (Table 4: 40 stacked LSTM, 15 RHN, 30 ON-LSTM, 15 MoS; Adam 1e-3; momentum SGD 2).
        optimizer: ``"sntasgd"`` (SGD, then SNT-ASGD once the validation loss stops improving), ``"ntasgd"``
            (standard NT-ASGD, which ignores the masks when averaging: the dense baselines and the ablation),
            ``"sgd"`` (never averages), ``"momentum"`` (momentum SGD with a plateau lr drop) or ``"adam"``
            (``betas=(0, 0.999)``, ``eps=1e-9``, plateau lr drop).
        weight_decay: coupled L2 on every parameter, biases and embeddings included (1.2e-6 in every script).
        momentum: momentum of ``optimizer="momentum"``.
        adam_betas: Adam's betas (the awd-lstm-lm code uses ``(0, 0.999)``).
        adam_eps: Adam's eps.
        plateau_factor: factor of the ReduceLROnPlateau drop for ``adam``/``momentum``; None = Table 4 (Adam 0.5,
            momentum SGD 1/1.33).
        plateau_patience: epochs without improvement before the drop; None = Table 4 (Adam 2, momentum SGD 1).
        clip: global gradient-norm clip over the dense gradient, before the step; None disables it. A
            ``Trainer(gradient_clip_val=...)`` takes precedence.
        bptt: the mean window length; a window of ``seq_len`` steps trains at ``lr * seq_len / bptt`` (the CLI links
            it to ``data.bptt``).
        sparsity: fraction of every sparsified weight tensor that is zero; None trains dense.
        prune_rate: initial fraction of active weights replaced at each epoch's topology update (cosine-annealed).
        static: keep the initial random masks for the whole run (static sparse training; ``prune_rate`` ignored).
        gate_redistribution: rank removal jointly over the gates of a stacked recurrent tensor (the method);
            False keeps each gate at its own count (the ablation).
        sparse_init: ``"uniform"`` (the same sparsity in every tensor) or ``"er"`` (Erdős–Rényi).
        removal: ``"magnitude"`` (Selfish-RNN) or ``"set"``; growth: ``"random"`` (Selfish-RNN), ``"gradient"``
            (RigL) or ``"momentum"`` (SNFS), for the paper's comparisons.
        growth: see ``removal``.
        sparsity_exclude: name patterns to keep dense, as in ``network.named_parameters()``; None uses the
            network's ``sparsity_exclude`` (e.g. the MoS prior).
        sparsity_seed: seed of the masks; None derives it from the global seed.
        update_every: topology updates once per epoch (``"epoch"``, the paper) or every this many optimizer steps.
        total_steps: length of the prune-rate cosine in optimizer steps; None uses the trainer's estimate, or the
            authors' ``max_epochs * train_rows // bptt`` when the length is unknown (variable BPTT).
        verbose_sparsity: log a per-tensor, per-gate summary after every topology update.
        nonmono: NT-ASGD's non-monotone interval (epochs).
        restart_at_epochs: epochs at which averaging restarts from the current weights (ON-LSTM: ``[500]``, and
            ``[500, 1000]`` for its 1300-epoch run).
        checkpoint: add a ``ModelCheckpoint`` that keeps the best ``val_loss`` model and the last one, unless the
            trainer already has a ``ModelCheckpoint`` with a monitor.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        lr: float,
        optimizer: OptimizerName = "sntasgd",
        weight_decay: float = 1.2e-6,
        momentum: float = 0.9,
        adam_betas: tuple[float, float] = (0.0, 0.999),
        adam_eps: float = 1e-9,
        plateau_factor: float | None = None,
        plateau_patience: int | None = None,
        clip: float | None = 0.25,
        bptt: int = 35,
        sparsity: float | None = None,
        prune_rate: float = 0.5,
        static: bool = False,
        gate_redistribution: bool = True,
        sparse_init: Literal["uniform", "er"] = "uniform",
        removal: Literal["magnitude", "set"] = "magnitude",
        growth: Literal["random", "gradient", "momentum"] = "random",
        sparsity_exclude: list[str] | None = None,
        sparsity_seed: int | None = None,
        update_every: int | Literal["epoch"] = "epoch",
        total_steps: int | None = None,
        verbose_sparsity: bool = True,
        nonmono: int = 5,
        restart_at_epochs: list[int] | None = None,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        for method in ("init_hidden", "forward"):
            if not callable(getattr(network, method, None)):
                raise TypeError(f"network {type(network).__name__} has no {method}(): see recipes.models.LMOutput")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        _check_positive_number("lr", lr)
        if clip is not None:
            _check_positive_number("clip", clip)
        if not isinstance(bptt, int) or isinstance(bptt, bool) or bptt < 1:
            raise ValueError(f"bptt must be a positive int, got {bptt!r}")
        if sparsity is not None and not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) or None (dense), got {sparsity!r}")
        if not isinstance(nonmono, int) or isinstance(nonmono, bool) or nonmono < 1:
            raise ValueError(f"nonmono must be an int >= 1, got {nonmono!r}")
        if plateau_factor is not None and not 0.0 < plateau_factor < 1.0:
            raise ValueError(f"plateau_factor must be in (0, 1), got {plateau_factor!r}")
        self._save_hyperparameters(network)

        self.network = network
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self.adam_betas = (float(adam_betas[0]), float(adam_betas[1]))
        self.adam_eps = float(adam_eps)
        factor, patience = PLATEAU_DEFAULTS.get(optimizer, (0.5, 2))
        self.plateau_factor = float(plateau_factor) if plateau_factor is not None else factor
        self.plateau_patience = int(plateau_patience) if plateau_patience is not None else patience
        self.clip = clip
        self.bptt = bptt
        self.sparsity = sparsity
        self.prune_rate = 0.0 if static else float(prune_rate)
        self.static = static
        self.gate_redistribution = gate_redistribution
        self.sparse_init = sparse_init
        self.removal = removal
        self.growth = growth
        self.sparsity_exclude = list(
            sparsity_exclude if sparsity_exclude is not None else getattr(network, "sparsity_exclude", [])
        )
        self.sparsity_seed = sparsity_seed
        self.update_every = update_every
        self.total_steps = total_steps
        self.verbose_sparsity = verbose_sparsity
        self.nonmono = nonmono
        self.restart_at_epochs = list(restart_at_epochs or [])
        self.checkpoint = checkpoint

        self.alpha = float(getattr(network, "alpha", 0.0) or 0.0)
        self.beta = float(getattr(network, "beta", 0.0) or 0.0)

        # Token-weighted means of the cross-entropy over a whole split: perplexity is exp of these.
        self.train_ce = TokenWeightedCrossEntropy()
        self.val_ce = TokenWeightedCrossEntropy()
        self.test_ce = TokenWeightedCrossEntropy()

        self._train_hidden: tuple[int, Any] | None = None  # (batch size, detached state) carried across windows
        self._eval_hidden: tuple[int, Any] | None = None
        self._lr_scale = 1.0
        self._sparsity_callback: SelfishSparsityCallback | None = None

    def _save_hyperparameters(self, network: nn.Module) -> None:
        # Under LightningCLI the hyperparameters are the parsed config, where ``network`` is a class path with its
        # arguments: keeping it lets ``load_from_checkpoint`` and ``--ckpt_path`` rebuild the model. Called from
        # plain Python, ``network`` is the module itself, which the state dict already holds: not saved twice.
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters

        given = _given_hyperparameters.get()
        network_is_config = isinstance(given, dict) and not isinstance(given.get("network"), nn.Module)
        self.save_hyperparameters(ignore=None if network_is_config else ["network"])

    # ------------------------------------------------------------------------------------------------------------
    # forward and loss
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, input: Tensor, hidden: Any = None) -> Any:
        """Run the network on ``input`` ``(T, B)`` from ``hidden`` (zeros when None); returns its ``LMOutput``."""
        if hidden is None:
            hidden = self.network.init_hidden(input.size(1))
        return self.network(input, hidden)

    def regularization(self, ar: Tensor | None, tar: Tensor | None) -> Tensor | None:
        """AR ``alpha * mean(ar²)`` plus TAR ``beta * mean((tar[t+1] - tar[t])²)``; None when neither applies."""
        terms = []
        if self.alpha and ar is not None:
            terms.append(self.alpha * ar.pow(2).mean())
        if self.beta and tar is not None and tar.size(0) > 1:
            terms.append(self.beta * (tar[1:] - tar[:-1]).pow(2).mean())
        return sum(terms[1:], terms[0]) if terms else None

    def _step(self, batch: Any, carried: tuple[int, Any] | None) -> tuple[Tensor, Any, tuple[int, Any], int]:
        # ``carried`` is (batch size, state) from the previous window of the same pass, or None at its start.
        input, target = batch[0], batch[1]
        batch_size = input.size(1)
        fresh = carried is None or carried[0] != batch_size
        hidden = self.network.init_hidden(batch_size) if fresh else carried[1]
        out = self.network(input, hidden)
        ce = F.nll_loss(out.log_probs, target)
        return ce, out, (batch_size, detach_hidden(out.hidden)), target.numel()

    # ------------------------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self._train_hidden = None  # every epoch starts from a zero state (MODELS.md 1.4)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seq_len = batch[2] if len(batch) > 2 else batch[0].size(0)
        self._lr_scale = float(seq_len) / self.bptt

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ce, out, self._train_hidden, tokens = self._step(batch, self._train_hidden)
        loss = ce
        reg = self.regularization(out.ar, out.tar)
        if reg is not None:
            loss = ce + reg
        ce = ce.detach()
        self.train_ce.update(ce, tokens)
        # Lightning reads every logged progress-bar value back to the host, a GPU sync per step: log the step's
        # loss only at the steps whose metrics Lightning writes (every log_every_n_steps).
        if self._logs_this_step():
            if reg is not None:
                self.log("train_reg", reg.detach(), on_step=True, on_epoch=False)
            self.log("train_loss", ce, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train_ppl", torch.exp(ce), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _logs_this_step(self) -> bool:
        # Lightning's own rule for the steps whose metrics reach the loggers (private, stable across 2.x).
        trainer = self._trainer
        return trainer is None or trainer._logger_connector.should_update_logs

    def on_train_epoch_end(self) -> None:
        if self.train_ce.update_count:
            mean = self.train_ce.compute()
            self.log("train_loss_epoch", mean)
            self.log("train_ppl_epoch", torch.exp(mean))
        self.train_ce.reset()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step at ``lr * seq_len / bptt`` (variable BPTT), the configured lr restored right after it."""
        scale = self._lr_scale
        if scale == 1.0:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            return
        groups = optimizer.param_groups
        saved = [group["lr"] for group in groups]
        for group, lr in zip(groups, saved):
            group["lr"] = lr * scale
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for group, lr in zip(groups, saved):
                group["lr"] = lr

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning calls this after backward and the callbacks' on_before_optimizer_step, before the step: the
        # gradient is still dense here (the sparsity callback re-zeroes the weights after the step).
        clip = gradient_clip_val if gradient_clip_val is not None else self.clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._eval_hidden = None

    def on_test_epoch_start(self) -> None:
        self._eval_hidden = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ce, _, self._eval_hidden, tokens = self._step(batch, self._eval_hidden)
        self.val_ce.update(ce, tokens)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        ce, _, self._eval_hidden, tokens = self._step(batch, self._eval_hidden)
        self.test_ce.update(ce, tokens)

    def on_validation_epoch_end(self) -> None:
        self._log_split("val", self.val_ce)

    def on_test_epoch_end(self) -> None:
        self._log_split("test", self.test_ce)

    def _log_split(self, split: str, metric: TokenWeightedCrossEntropy) -> None:
        # Σ_windows tokens·CE / Σ tokens: exactly Selfish main.py's Σ L·CE / (rows - 1) (MODELS.md 1.5).
        if metric.update_count:
            mean = metric.compute()
            self.log(f"{split}_loss", mean, prog_bar=split != "val")
            self.log(f"{split}_ppl", torch.exp(mean), prog_bar=True)
        metric.reset()
        self._eval_hidden = None

    # ------------------------------------------------------------------------------------------------------------
    # optimizers and callbacks
    # ------------------------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        params = list(self.network.parameters())  # tied weights appear once
        name = self.optimizer_name
        if name == "sntasgd":
            return SNTASGD(params, lr=self.lr, weight_decay=self.weight_decay)
        if name == "ntasgd":
            return MaskBlindNTASGD(params, lr=self.lr, weight_decay=self.weight_decay)
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        if name == "momentum":
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.Adam(
                params, lr=self.lr, betas=self.adam_betas, eps=self.adam_eps, weight_decay=self.weight_decay
            )
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.plateau_factor, patience=self.plateau_patience, threshold=0.0
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch", "frequency": 1},
        }

    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = []
        if self.sparsity is not None:
            self._sparsity_callback = SelfishSparsityCallback(
                sparsity=self.sparsity,
                prune_rate=self.prune_rate,
                init=self.sparse_init,
                removal=self.removal,
                growth=self.growth,
                gate_redistribution=self.gate_redistribution,
                exclude=[f"network.{pattern}" for pattern in self.sparsity_exclude] or None,
                seed=self.sparsity_seed,
                update_every=self.update_every,
                total_steps=self.total_steps,
                verbose=self.verbose_sparsity,
            )
            callbacks.append(self._sparsity_callback)
        if self.optimizer_name in AVERAGING_OPTIMIZERS:
            callbacks.append(
                NonMonotonicTrigger(monitor="val_loss", nonmono=self.nonmono, restart_at_epochs=self.restart_at_epochs)
            )
        if self.checkpoint and not self._trainer_has_monitored_checkpoint():
            callbacks.append(
                ModelCheckpoint(
                    monitor="val_loss",
                    mode="min",
                    save_last=True,
                    filename="epoch{epoch:04d}-val_ppl{val_ppl:.2f}",
                    auto_insert_metric_name=False,
                )
            )
        return callbacks

    def _trainer_has_monitored_checkpoint(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        return any(isinstance(cb, ModelCheckpoint) and cb.monitor is not None for cb in trainer.callbacks)

    def setup(self, stage: str) -> None:
        # The prune-rate cosine needs the run's length in steps before the sparsity callback's on_fit_start. With
        # variable BPTT Lightning cannot know it (the windows have no len()); the authors use
        # epochs * train_rows // bptt for every model, which is what is given here.
        callback = self._sparsity_callback
        if stage != "fit" or callback is None or callback.total_steps is not None:
            return
        callback.total_steps = self._schedule_length()

    def _schedule_length(self) -> int | None:
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if not getattr(datamodule, "variable_bptt", False):
            return None  # the trainer's estimated_stepping_batches is exact
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            if trainer.max_steps and trainer.max_steps > 0:
                return int(trainer.max_steps)
            return None
        steps = trainer.max_epochs * datamodule.split_rows("train") // datamodule.bptt
        if trainer.max_steps and trainer.max_steps > 0:
            steps = min(steps, trainer.max_steps)
        return max(1, int(steps))


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def detach_hidden(hidden: Any) -> Any:
    """Detach a hidden state made of tensors nested in tuples and lists (truncated BPTT)."""
    if isinstance(hidden, Tensor):
        return hidden.detach()
    if isinstance(hidden, tuple):
        return tuple(detach_hidden(h) for h in hidden)
    if isinstance(hidden, list):
        return [detach_hidden(h) for h in hidden]
    return hidden


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
