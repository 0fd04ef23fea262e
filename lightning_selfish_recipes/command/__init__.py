"""The parts of the ``selfish-rnn`` command (:mod:`lightning_selfish_recipes.cli`), one concern per module:
its help, the wording of parsing errors, dependency noise, checkpoint paths and the checks made right after parsing
(docs/architecture.md#the-recipes)."""
