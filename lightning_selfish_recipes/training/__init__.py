"""The parts of the recipes' training loop that :class:`~lightning_selfish_recipes.lm.LanguageModel` puts together,
one concern per module (docs/architecture.md#the-recipes)."""
