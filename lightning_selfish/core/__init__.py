"""The sparse core, plain torch: masks and their enforcement, one topology update over a set of masks, the rules for
optimizer state, gate layouts and the small value types. Imports only the method layer."""
