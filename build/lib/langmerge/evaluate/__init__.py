"""Evaluation: `evaluate(recipe, "merged:ties")` scores a model per language (see `job.py`);
`metrics` holds the scores themselves."""


def __getattr__(name: str):
    if name == "evaluate":  # imported on use: the metrics alone need no torch
        from langmerge.evaluate.job import evaluate

        return evaluate
    raise AttributeError(name)
