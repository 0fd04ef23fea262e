"""The tools around training runs: ``selfish-rnn results`` (runs filed under the paper's cells: ``results``,
``matching``, ``paper_results``), ``list`` (``experiments``), ``analyze`` (topology figures), ``export`` and
``generate``. The training path itself (model, data, LightningModule, CLI) is the rest of
``lightning_selfish_recipes``."""
