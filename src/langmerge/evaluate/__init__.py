"""The evaluation engine: predictions, the task's metrics, health verdicts and significance.
Scoring a project's models per language is `langmerge.workflows.evaluation.evaluate`."""
