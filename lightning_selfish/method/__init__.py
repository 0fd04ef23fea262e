"""The method layer (bottom): parts, the catalogue of presets and registries, schedules, and the selection and
score functions the parts hold. Plain Python and torch; imports nothing else of the library."""
