"""The Lightning glue: the only folder that imports Lightning. Callbacks whose hooks delegate to the run, the core
and the analysis layers."""
