"""The run, without Lightning: the controller (the one effective method, its schedule state, seeds) and the choice
of the parameters to sparsify. Imports the core and the method layer."""
