"""Project primitives: the recipe (a pure description), the run directory and its registry."""
