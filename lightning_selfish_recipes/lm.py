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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish_recipes.compat import given_hyperparameters, logs_this_step, module, pl
from lightning_selfish_recipes.metrics import TokenWeightedCrossEntropy
from lightning_selfish_recipes.training.bptt import (
    carried_state_of_this_rank,
    carried_states_of_every_rank,
    detach_hidden,
    scaled_lr,
    schedule_length,
    to_device,
    window_lr_scale,
)
from lightning_selfish_recipes.training.callbacks import run_callbacks, run_checkpoints
from lightning_selfish_recipes.training.checks import (
    check_network,
    check_single_device_for_column_groups,
    check_small_batch_size,
    check_training_arguments,
    check_training_seed,
)
from lightning_selfish_recipes.training.column_groups import GroupGradients, group_sizes
from lightning_selfish_recipes.training.optimizers import (
    AVERAGING_OPTIMIZERS,
    OPTIMIZERS,
    PLATEAU_DEFAULTS,
    MaskBlindNTASGD,
    OptimizerName,
    build_optimizer,
)
from lightning_selfish_recipes.training.sparsity_arguments import (
    SPARSITY_ARGUMENTS,
    SparsityArguments,
    as_sparsity_arguments,
    callback_arguments,
    sparsity_callback,
)

Callback = pl.Callback
rank_zero_warn = module("utilities.rank_zero").rank_zero_warn

__all__ = [
    "AVERAGING_OPTIMIZERS",
    "OPTIMIZERS",
    "PLATEAU_DEFAULTS",
    "SPARSITY_ARGUMENTS",
    "LanguageModel",
    "MaskBlindNTASGD",
    "OptimizerName",
    "SparsityArguments",
    "detach_hidden",
    "run_checkpoints",
]


class LanguageModel(pl.LightningModule):
    r"""A stateful RNN language model trained as in Selfish-RNN, dense or sparse.

    (One class of ~390 lines, 80 of them this docstring, on purpose: it is the authors' training loop as one
    LightningModule, whose hooks share the carried hidden state, the variable-BPTT learning-rate scaling, MoS's
    column groups and the split metrics; the argument checks, the sparsity group, the optimizers, truncated BPTT,
    the column groups' gradients and the run's callbacks are in :mod:`lightning_selfish_recipes.training`.)

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
        check_network(network)
        check_training_arguments(
            optimizer=optimizer, lr=lr, clip=clip, bptt=bptt, nonmono=nonmono, plateau_factor=plateau_factor
        )
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
        check_small_batch_size(small_batch_size)
        self.sparsity: SparsityArguments | None = as_sparsity_arguments(sparsity)
        self.flops = flops
        self.small_batch_size = small_batch_size
        self.nonmono = nonmono
        self.restart_at_epochs = list(restart_at_epochs or [])
        self.checkpoint = checkpoint
        self.topology_monitor = topology_monitor
        self.mask_history = mask_history
        check_training_seed(training_seed)
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
        self._group_grads = GroupGradients()  # small_batch_size: the gradients of a step's earlier groups
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
            self._train_hidden = to_device(self._train_hidden, self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the hidden state carried to the next training window, so a mid-epoch resume carries it on."""
        checkpoint["train_hidden"] = carried_states_of_every_rank(self._train_hidden, self._trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # absent from older checkpoints: the state starts at zero
        self._train_hidden = carried_state_of_this_rank(checkpoint.get("train_hidden"), self._trainer, rank_zero_warn)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._lr_scale = window_lr_scale(batch, self.bptt)

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
        if carried is not None and [size for size, _ in carried] != group_sizes(batch_size, self.small_batch_size):
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
        precision = self.trainer.strategy.precision_plugin  # the loss scale of mixed precision
        self._group_grads.accumulate(loss, params, lambda loss: precision.pre_backward(loss, self))

    def on_after_backward(self) -> None:
        self._group_grads.add_to_grads()

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
        if self._lr_scale == 1.0:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            return
        with scaled_lr(optimizer, self._lr_scale):
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

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
        return build_optimizer(
            self.network.parameters(),  # tied weights appear once
            self.optimizer_name,
            lr=self.lr,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            adam_betas=self.adam_betas,
            adam_eps=self.adam_eps,
            plateau_factor=self.plateau_factor,
            plateau_patience=self.plateau_patience,
        )

    def configure_callbacks(self) -> list[Callback]:
        if self.sparsity is not None:
            self._sparsity_callback = self._sparsity_callback_or_error()
        return run_callbacks(
            self._trainer,
            sparsity_callback=self._sparsity_callback if self.sparsity is not None else None,
            topology_monitor=self.topology_monitor,
            mask_history=self.mask_history,
            flops=self.flops,
            optimizer_name=self.optimizer_name,
            nonmono=self.nonmono,
            restart_at_epochs=self.restart_at_epochs,
            checkpoint=self.checkpoint,
        )

    def sparsity_arguments(self) -> dict[str, Any]:
        """The keyword arguments of the run's ``SelfishSparsityCallback``: the ``sparsity`` group in the module's terms.

        The parameter names of ``include``, ``exclude`` and ``gate_layouts`` get the ``network.`` prefix, ``exclude``
        defaults to the network's ``sparsity_exclude``, and ``total_steps=None`` becomes
        :func:`~lightning_selfish_recipes.training.bptt.schedule_length`, which the callback asks at fit start.
        Raises ``RuntimeError`` for a dense model.
        """
        if self.sparsity is None:
            raise RuntimeError("sparsity_arguments(): this LanguageModel trains dense (sparsity=None)")
        return callback_arguments(self.sparsity, self.network, schedule_length)

    def _sparsity_callback_or_error(self) -> SelfishSparsityCallback:
        # The callback checks its arguments; its messages name them as "sparsity.<argument>" (--model.sparsity.*).
        return sparsity_callback(self.sparsity_arguments())

    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_single_device_for_column_groups(self.small_batch_size, self.trainer.world_size)
