"""The demo: its data, built from a PyPI package, and its script."""
