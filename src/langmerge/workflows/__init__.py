"""Project workflows: what the commands do, wiring the engines to a recipe and its run directory."""
