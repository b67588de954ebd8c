"""Base models: local or hub checkpoints, and the embedded default backbone."""
