"""Recipes: data, models and command-line entry points that reproduce the Selfish-RNN experiments."""
