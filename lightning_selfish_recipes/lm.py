"""``LanguageModel``: the training loop of the Selfish-RNN recipes as one LightningModule.

It wraps any network with the interface of :mod:`lightning_selfish_recipes.models` (``init_hidden(B)`` and
``forward(input (T, B), hidden) -> LMOutput(log_probs, hidden, ar, tar)``) and reproduces the loop the four
reference codebases share (docs/models.md#the-training-loop):

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
averaged-SGD optimizers, checkpoints of the best validation epoch and of the latest epoch
(:func:`run_checkpoints`), and ``RandomStateCheckpoint``.
A checkpoint also holds the hidden state carried to the next training window, so together with the DataModule's
position in the epoch a resumed fit is exactly the uninterrupted one, dropout included (docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish.callbacks.flops import FlopsCallback
from lightning_selfish.callbacks.history import MaskHistory
from lightning_selfish.callbacks.monitor import TopologyMonitor
from lightning_selfish.callbacks.random_state import RandomStateCheckpoint
from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish.callbacks.trigger import NonMonotonicTrigger
from lightning_selfish.core.optim_state import MaskUpdate
from lightning_selfish.optim.sntasgd import SNTASGD
from lightning_selfish_recipes.compat import given_hyperparameters, logs_this_step, module, pl
from lightning_selfish_recipes.metrics import TokenWeightedCrossEntropy

Callback = pl.Callback
rank_zero_warn = module("utilities.rank_zero").rank_zero_warn
ModelCheckpoint = pl.callbacks.ModelCheckpoint

OptimizerName = Literal["sntasgd", "ntasgd", "sgd", "momentum", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sntasgd", "ntasgd", "sgd", "momentum", "adam")
AVERAGING_OPTIMIZERS: tuple[str, ...] = ("sntasgd", "ntasgd")

#: Table 4's learning-rate drops "(A x, B)": divide by A after B epochs without improvement of ``val_loss``.
PLATEAU_DEFAULTS: dict[str, tuple[float, int]] = {"adam": (0.5, 2), "momentum": (1.0 / 1.33, 1)}


def _keyword_arguments_of(cls: type, name: str) -> type:
    """A frozen dataclass whose fields are the arguments of ``cls.__init__``: same names, types and defaults.

    Typed with it, a parameter is one nested group on the command line and in YAML (jsonargparse reads the fields,
    their types and the ``Args:`` of ``cls``'s docstring for the help), validated field by field, and never out of
    step with ``cls``: there is no second list of its arguments to keep.
    """
    hints = typing.get_type_hints(cls.__init__)
    fields = []
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty:
            field = dataclasses.field()
        elif isinstance(parameter.default, (list, dict, set)):
            field = dataclasses.field(default_factory=lambda default=parameter.default: type(default)(default))
        else:
            field = dataclasses.field(default=parameter.default)
        fields.append((parameter.name, hints[parameter.name], field))
    made = dataclasses.make_dataclass(name, fields, kw_only=True, frozen=True)
    made.__module__ = __name__
    summary, _, details = (inspect.getdoc(cls) or "").partition("\n\n")
    made.__doc__ = f"The arguments of {cls.__name__} (its names, types and defaults).\n\n{details}"
    return made


SparsityArguments = _keyword_arguments_of(SelfishSparsityCallback, "SparsityArguments")
"""``LanguageModel(sparsity=...)``: the arguments of :class:`~lightning_selfish.SelfishSparsityCallback`, as a
frozen dataclass made from its signature (``SparsityArguments(sparsity=0.67, method="rigl")``). On the command line
they are ``--model.sparsity.<argument>``, in YAML ``model: {sparsity: {sparsity: 0.67, method: rigl}}``."""

SPARSITY_ARGUMENTS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(SparsityArguments))
"""The names of :data:`SparsityArguments`' fields (the callback's arguments)."""


class MaskBlindNTASGD(SNTASGD):
    """Standard NT-ASGD on a sparse model: the ablation "without SNT-ASGD" (Table 5).

    Every weight is averaged over the whole averaging phase, whatever its lifetime. The sparsity engine still
    multiplies the average by the mask after every step (it does so for every optimizer state tensor), so the
    averaged model has exactly the current topology, but a weight grown after the trigger has been zero for most
    of the window and its average stays near zero: the failure mode SNT-ASGD removes. On a dense model this is
    identical to :class:`~lightning_selfish.optim.sntasgd.SNTASGD`.
    """

    #: Unlike SNT-ASGD, the step does write averages at inactive positions: the engine re-zeroes them.
    keeps_inactive_state_zero = False

    def on_mask_update(self, param: Tensor, update: MaskUpdate) -> None:
        """Ignore topology changes: the average of every tensor is the dense running mean since the trigger."""


class LanguageModel(pl.LightningModule):
    r"""A stateful RNN language model trained as in Selfish-RNN, dense or sparse.

    (One class of ~500 lines on purpose: it is the authors' training loop as one LightningModule, whose hooks share
    the carried hidden state, the variable-BPTT learning-rate scaling, MoS's column groups and the split metrics;
    the networks, data, optimizers and sparse training live in their own modules.)

    Args:
        network: the language model (e.g. :class:`lightning_selfish_recipes.models.StackedLSTM`); see the module
            docstring for the interface. Its ``alpha``/``beta`` attributes weight AR/TAR, its ``sparsity_exclude``
            patterns (names as in ``network.named_parameters()``) stay dense.
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
        sparsity: the arguments of :class:`~lightning_selfish.SelfishSparsityCallback`, with its own names and
            defaults, as one group (a :data:`SparsityArguments` or a mapping of the same names, e.g.
            ``{"sparsity": 0.67, "method": "rigl", "prune_rate": 0.7}``); None trains dense. ``method`` picks the
            sparse training method (``"selfish"``, ``"static"``, ``"set"``, ``"dsr"``, ``"snfs"``, ``"rigl"``,
            ``"gmp"``; ``docs/methods.md``), the other arguments override parts of its preset. Three of them are read
            in the network's terms: the parameter names in ``include``, ``exclude`` and ``gate_layouts`` are those of
            ``network.named_parameters()`` (the module adds the ``network.`` prefix), and ``exclude=None`` keeps the
            network's own ``sparsity_exclude`` patterns dense (e.g. the MoS prior; a list replaces them).
            ``total_steps=None`` lets the module decide the prune-rate cosine's length at fit start: the trainer's
            estimate, or the authors' ``max_epochs * train_rows // bptt`` for variable BPTT, whose length Lightning
            cannot know.
            On the command line ``--model.sparsity.<argument>`` (``--model.sparsity.help`` lists them), in YAML
            ``sparsity: {sparsity: 0.67, method: rigl}``.
        flops: add a :class:`~lightning_selfish.FlopsCallback` (``flops/train_vs_dense``, ``flops/inference_vs_dense``).
        small_batch_size: split every training batch into column groups of this many sequences, each with its own
            hidden state and dropout masks, and accumulate their gradients before one step (AWD-LSTM-MoS's
            ``small_batch_size``); None trains on the whole batch at once.
        nonmono: NT-ASGD's non-monotone interval (epochs).
        restart_at_epochs: epochs at which averaging restarts from the current weights (ON-LSTM: ``[500]``, and
            ``[500, 1000]`` for its 1300-epoch run).
        checkpoint: add the two ``ModelCheckpoint``\ s of :func:`run_checkpoints` (the best ``val_loss`` model,
            and the latest epoch in ``last.ckpt``), unless the trainer already has a ``ModelCheckpoint`` with a
            monitor.
        topology_monitor: when sparse, add a :class:`~lightning_selfish.callbacks.monitor.TopologyMonitor` (exploration,
            weights above 0.1, mask pictures, the final gate chart; see docs/analysis.md).
        mask_history: when sparse and the trainer has a logger, save every epoch's masks bit-packed in
            ``<log_dir>/masks`` for ``selfish-rnn analyze`` (:class:`~lightning_selfish.callbacks.history.MaskHistory`).
        training_seed: reseed the global random generators (torch, Python, NumPy: dropout, shuffling) with this
            seed when a fresh fit starts, after the network's weights were drawn under ``seed_everything``. Two runs
            with the same ``seed_everything`` and ``sparsity.seed`` and different ``training_seed`` (and
            ``sparsity.growth_seed``, ``data.seed``) start from the same weights and masks and train apart: the
            paper's Figure 4 (right), docs/analysis.md. None: the run's ``seed_everything`` stream goes on.
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
        sparsity: SparsityArguments | None = None,
        flops: bool = True,
        small_batch_size: int | None = None,
        nonmono: int = 5,
        restart_at_epochs: list[int] | None = None,
        checkpoint: bool = True,
        topology_monitor: bool = True,
        mask_history: bool = True,
        training_seed: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        for required in ("init_hidden", "forward"):
            if not callable(getattr(network, required, None)):
                raise TypeError(
                    f"network {type(network).__name__} has no {required}(): "
                    f"see lightning_selfish_recipes.models.LMOutput"
                )
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        _check_positive_number("lr", lr)
        if clip is not None:
            _check_positive_number("clip", clip)
        if not isinstance(bptt, int) or isinstance(bptt, bool) or bptt < 1:
            raise ValueError(f"bptt must be a positive int, got {bptt!r}")
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
        if small_batch_size is not None and (
            isinstance(small_batch_size, bool) or not isinstance(small_batch_size, int) or small_batch_size < 1
        ):
            raise ValueError(f"small_batch_size must be a positive int or None, got {small_batch_size!r}")
        self.sparsity: SparsityArguments | None = _sparsity_arguments(sparsity)
        self.flops = flops
        self.small_batch_size = small_batch_size
        self.nonmono = nonmono
        self.restart_at_epochs = list(restart_at_epochs or [])
        self.checkpoint = checkpoint
        self.topology_monitor = topology_monitor
        self.mask_history = mask_history
        if training_seed is not None and (isinstance(training_seed, bool) or not isinstance(training_seed, int)):
            raise TypeError(f"training_seed must be an int or None, got {training_seed!r}")
        self.training_seed = training_seed

        self.alpha = float(getattr(network, "alpha", 0.0) or 0.0)
        self.beta = float(getattr(network, "beta", 0.0) or 0.0)

        # Token-weighted means of the cross-entropy over a whole split: perplexity is exp of these.
        self.train_ce = TokenWeightedCrossEntropy()
        self.val_ce = TokenWeightedCrossEntropy()
        self.test_ce = TokenWeightedCrossEntropy()

        # (batch size, detached state) carried across windows; with small_batch_size a list of them, one per group
        self._train_hidden: Any = None
        self._eval_hidden: tuple[int, Any] | None = None
        self._lr_scale = 1.0
        self._group_grads: dict[Tensor, Tensor | None] | None = None  # small_batch_size: earlier groups' gradients
        self._sparsity_callback: SelfishSparsityCallback | None = None
        if self.sparsity is not None:
            self._sparsity_callback_or_error()  # the callback's own checks of the group, before any work

    def _save_hyperparameters(self, network: nn.Module) -> None:
        # Under LightningCLI the hyperparameters are the parsed config, where ``network`` is a class path with its
        # arguments: keeping it lets ``load_from_checkpoint`` and ``--ckpt_path`` rebuild the model. Called from
        # plain Python, ``network`` is the module itself, which the state dict already holds: not saved twice.
        given = given_hyperparameters()
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
        self._train_hidden = None  # every epoch starts from a zero state (docs/models.md#hidden-state)

    def on_fit_start(self) -> None:
        # A fresh fit only: a resumed one restores the random states it saved (RandomStateCheckpoint).
        if self.training_seed is not None and self.trainer.ckpt_path is None:
            pl.seed_everything(self.training_seed, verbose=False)

    def on_train_start(self) -> None:
        # a state restored from a mid-epoch checkpoint (on_load_checkpoint) goes to the device the model is on now
        if self._train_hidden is not None:
            self._train_hidden = _to_device(self._train_hidden, self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the hidden state carried to the next training window, so a mid-epoch resume carries it on."""
        hidden = _to_device(self._train_hidden, "cpu")
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * trainer.world_size  # every rank carries its own columns' states
            torch.distributed.all_gather_object(ranks, hidden)
        else:
            ranks = [hidden]
        checkpoint["train_hidden"] = ranks

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ranks = checkpoint.get("train_hidden")  # absent from older checkpoints: the state starts at zero
        trainer = self._trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_hidden = None
        if isinstance(ranks, list) and len(ranks) == world_size:
            self._train_hidden = ranks[rank]
        elif isinstance(ranks, list):
            rank_zero_warn(
                f"the checkpoint holds the carried hidden states of {len(ranks)} process(es), this run has "
                f"{world_size}: a resume in the middle of an epoch starts the hidden state at zero"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seq_len = batch[2] if len(batch) > 2 else batch[0].size(0)
        self._lr_scale = float(seq_len) / self.bptt

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.small_batch_size is not None and self.small_batch_size < batch[0].size(1):
            return self._training_step_in_groups(batch)
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

    def _training_step_in_groups(self, batch: Any) -> Tensor:
        """AWD-LSTM-MoS's ``small_batch_size``: the columns in groups, each its own state, one accumulated step.

        Group ``k`` holds columns ``[k*s, (k+1)*s)`` and carries its own hidden state from window to window; each
        group's forward draws its own dropout masks. Its loss (cross-entropy + AR + TAR) is scaled by
        ``group size / batch size``, so the accumulated gradient is the gradient of the whole batch's loss. The
        backward of every group but the last runs here, which frees its graph before the next group's forward (the
        point of the split: memory) as ``torch.autograd.grad`` into a buffer that :meth:`on_after_backward` adds to
        the gradients (Lightning zeroes ``.grad`` between ``training_step`` and its backward); Lightning runs the
        last one, then clips and steps once.
        """
        input, target = batch[0], batch[1]
        steps, batch_size = input.size(0), input.size(1)
        target = target.view(steps, batch_size)
        starts = range(0, batch_size, self.small_batch_size)
        carried = self._train_hidden if isinstance(self._train_hidden, list) else None
        if carried is not None and [size for size, _ in carried] != [
            min(self.small_batch_size, batch_size - start) for start in starts
        ]:
            carried = None
        hidden_out: list[tuple[int, Any]] = []
        ce_sum = input.new_zeros((), dtype=torch.float32)
        reg_sum = None
        loss = None
        for k, start in enumerate(starts):
            if loss is not None:
                self._accumulate_group_gradient(loss)
            columns = slice(start, start + self.small_batch_size)
            group = (input[:, columns], target[:, columns].reshape(-1))
            ce, out, state, tokens = self._step(group, carried[k] if carried is not None else None)
            hidden_out.append(state)
            share = tokens / target.numel()
            loss = ce
            reg = self.regularization(out.ar, out.tar)
            if reg is not None:
                loss = ce + reg
                reg_sum = reg.detach() * share if reg_sum is None else reg_sum + reg.detach() * share
            loss = loss * share
            ce = ce.detach()
            self.train_ce.update(ce, tokens)
            ce_sum = ce_sum + ce * share
        self._train_hidden = hidden_out
        if self._logs_this_step():
            if reg_sum is not None:
                self.log("train_reg", reg_sum, on_step=True, on_epoch=False)
            self.log("train_loss", ce_sum, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train_ppl", torch.exp(ce_sum), on_step=True, on_epoch=False, prog_bar=True)
        assert loss is not None
        return loss

    def _accumulate_group_gradient(self, loss: Tensor) -> None:
        params = [p for p in self.parameters() if p.requires_grad]
        scaled = self.trainer.strategy.precision_plugin.pre_backward(loss, self)  # the loss scale of mixed precision
        grads = torch.autograd.grad(scaled, params, allow_unused=True)
        if self._group_grads is None:
            self._group_grads = dict(zip(params, grads))
            return
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            held = self._group_grads.get(param)
            self._group_grads[param] = grad if held is None else held.add_(grad)

    def on_after_backward(self) -> None:
        groups, self._group_grads = self._group_grads, None
        if not groups:
            return
        with torch.no_grad():
            for param, grad in groups.items():
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)

    def _logs_this_step(self) -> bool:
        trainer = self._trainer
        return trainer is None or logs_this_step(trainer)

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
        # Σ_windows tokens·CE / Σ tokens: exactly Selfish main.py's Σ L·CE / (rows - 1)
        # (docs/models.md#loss-and-perplexity).
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
            self._sparsity_callback = self._sparsity_callback_or_error()
            callbacks.append(self._sparsity_callback)
            if self.topology_monitor:
                callbacks.append(TopologyMonitor())
            if self.mask_history and self._trainer_has_logger():  # the masks go beside the run's logs
                callbacks.append(MaskHistory())
        if self.flops:
            callbacks.append(FlopsCallback())
        callbacks.append(RandomStateCheckpoint())  # resumes draw the dropout masks the saved run would have
        if self.optimizer_name in AVERAGING_OPTIMIZERS:
            callbacks.append(
                NonMonotonicTrigger(monitor="val_loss", nonmono=self.nonmono, restart_at_epochs=self.restart_at_epochs)
            )
        if self.checkpoint and not self._trainer_has_monitored_checkpoint():
            self._drop_default_checkpoint()
            callbacks.extend(run_checkpoints())
        return callbacks

    def _drop_default_checkpoint(self) -> None:
        # Lightning replaces a trainer's callbacks by the module's callbacks of the same type, and says so on every
        # run; the ones without a monitor (the default one) would be replaced anyway, and are removed here instead.
        trainer = self._trainer
        if trainer is not None:
            trainer.callbacks = [
                cb for cb in trainer.callbacks if not (isinstance(cb, ModelCheckpoint) and cb.monitor is None)
            ]

    def sparsity_arguments(self) -> dict[str, Any]:
        """The keyword arguments of the run's ``SelfishSparsityCallback``: the ``sparsity`` group in the module's terms.

        The parameter names of ``include``, ``exclude`` and ``gate_layouts`` get the ``network.`` prefix, ``exclude``
        defaults to the network's ``sparsity_exclude``, and ``total_steps=None`` becomes :meth:`_schedule_length`,
        which the callback asks at fit start. Raises ``RuntimeError`` for a dense model.
        """
        if self.sparsity is None:
            raise RuntimeError("sparsity_arguments(): this LanguageModel trains dense (sparsity=None)")
        arguments = {name: getattr(self.sparsity, name) for name in SPARSITY_ARGUMENTS}
        exclude = arguments["exclude"]
        if exclude is None:
            exclude = getattr(self.network, "sparsity_exclude", None) or []
        arguments["exclude"] = [f"network.{pattern}" for pattern in exclude]
        if arguments["include"] is not None:
            arguments["include"] = [f"network.{pattern}" for pattern in arguments["include"]]
        if arguments["gate_layouts"] is not None:
            arguments["gate_layouts"] = {f"network.{name}": spec for name, spec in arguments["gate_layouts"].items()}
        if arguments["total_steps"] is None:
            arguments["total_steps"] = self._schedule_length
        return arguments

    def _sparsity_callback_or_error(self) -> SelfishSparsityCallback:
        # The callback checks its arguments; its messages name them as "sparsity.<argument>" (--model.sparsity.*).
        try:
            return SelfishSparsityCallback(**self.sparsity_arguments())
        except (TypeError, ValueError) as error:
            message = str(error)
            named = message.split(" ", 1)[0] in SPARSITY_ARGUMENTS
            raise type(error)(f"sparsity.{message}" if named else f"sparsity: {message}") from error

    def _trainer_has_logger(self) -> bool:
        trainer = self._trainer
        return trainer is None or bool(trainer.loggers)

    def _trainer_has_monitored_checkpoint(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        return any(isinstance(cb, ModelCheckpoint) and cb.monitor is not None for cb in trainer.callbacks)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.small_batch_size is not None and self.trainer.world_size > 1:
            raise ValueError(
                f"small_batch_size={self.small_batch_size} runs a backward per column group inside one training step, "
                f"which is only supported on a single device, not with {self.trainer.world_size} processes: give "
                "each process a smaller data.batch_size instead, or small_batch_size=None"
            )

    def _schedule_length(self, trainer: Any = None) -> int | None:
        """The prune-rate cosine's length in optimizer steps (the callback's ``total_steps``, asked at fit start).

        With fixed windows None: the trainer's ``estimated_stepping_batches`` is exact. Variable BPTT has no length
        Lightning can know; the authors use ``max_epochs * train_rows // bptt`` for every model, which is returned
        (capped by ``max_steps``).
        """
        trainer = self.trainer if trainer is None else trainer
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


def run_checkpoints() -> list[Callback]:
    """The run's checkpoints: the best ``val_loss`` epoch (``epoch<N>-val_ppl<ppl>.ckpt``) and the latest epoch
    (``last.ckpt``, rewritten after every epoch's validation), in that order.

    The latest one is a checkpoint of its own: Lightning 2.6's ``save_last=True`` beside a monitor writes
    ``last.ckpt`` only when the monitored checkpoint is saved, i.e. at the last epoch whose validation improved, and
    a resume from it would train the later epochs again. Both write at the same point (after validation, before the
    next epoch's topology update), the best one first, so ``last.ckpt`` records which checkpoint is best.
    """
    best = ModelCheckpoint(
        monitor="val_loss",
        mode="min",
        filename="epoch{epoch:04d}-val_ppl{val_ppl:.2f}",
        auto_insert_metric_name=False,
    )
    # No monitor, top 1: every epoch replaces the file; one name, so Lightning's own ckpt_path="last" finds it.
    latest = ModelCheckpoint(filename=ModelCheckpoint.CHECKPOINT_NAME_LAST, enable_version_counter=False)
    return [best, latest]


def _sparsity_arguments(sparsity: Any) -> SparsityArguments | None:
    """``LanguageModel(sparsity=...)`` as :data:`SparsityArguments` (a mapping of the same names is accepted)."""
    if sparsity is None:
        return None
    if isinstance(sparsity, SparsityArguments):
        _refuse_zero_sparsity(sparsity)
        return sparsity
    if isinstance(sparsity, (bool, int, float)):
        raise TypeError(
            f"sparsity must be the SelfishSparsityCallback arguments (e.g. {{'sparsity': {sparsity!r}}}) or None "
            f"(dense), got {sparsity!r}"
        )
    if not isinstance(sparsity, Mapping):
        raise TypeError(
            f"sparsity must be a SparsityArguments, a mapping of SelfishSparsityCallback arguments or None (dense), "
            f"got {type(sparsity).__name__}"
        )
    unknown = [str(name) for name in sparsity if name not in SPARSITY_ARGUMENTS]
    if unknown:
        raise TypeError(
            f"sparsity has no argument {', '.join(map(repr, unknown))}: the arguments of SelfishSparsityCallback "
            f"are {', '.join(SPARSITY_ARGUMENTS)}"
        )
    if "sparsity" not in sparsity:
        raise TypeError("sparsity.sparsity is required: the fraction of the sparsified weights that is zero")
    arguments = SparsityArguments(**sparsity)
    _refuse_zero_sparsity(arguments)
    return arguments


def _refuse_zero_sparsity(arguments: Any) -> None:
    """A sweep's dense point written as sparsity 0: the recipes' dense run is the one without the callback (the
    callback refuses 0 too, but can only name itself)."""
    value = arguments.sparsity
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0:
        raise ValueError(
            f"sparsity.sparsity must be in (0, 1), got {value!r}: a dense run has no sparsity callback: "
            "--model.sparsity null on the command line, `sparsity: null` in YAML "
            "(lightning_selfish_recipes/configs/methods/dense.yaml), "
            "LanguageModel(sparsity=None) in Python"
        )


def detach_hidden(hidden: Any) -> Any:
    """Detach a hidden state made of tensors nested in tuples and lists (truncated BPTT)."""
    if isinstance(hidden, Tensor):
        return hidden.detach()
    if isinstance(hidden, tuple):
        return tuple(detach_hidden(h) for h in hidden)
    if isinstance(hidden, list):
        return [detach_hidden(h) for h in hidden]
    return hidden


def _to_device(hidden: Any, device: Any) -> Any:
    """A carried hidden state (tensors nested in tuples and lists, with ints beside them) on ``device``."""
    if isinstance(hidden, Tensor):
        return hidden.to(device)
    if isinstance(hidden, (tuple, list)):
        return type(hidden)(_to_device(h, device) for h in hidden)
    return hidden


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
