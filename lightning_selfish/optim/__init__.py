"""Optimizers that take part in sparse training (SNT-ASGD). Imports the core and the method layer."""
