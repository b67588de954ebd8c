"""The demo's script after the study: the maintenance story on the embedded default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from langmerge.demo.data import SPARE, UPDATED
from langmerge.workflows.maintenance import GuardError, Outcome, update


def demo_story(recipe_path: Path, progress: bool, say: Callable[[str], None],
               show: Callable[[Outcome], None]) -> list[Outcome]:  # fmt: skip
    """The demo's maintenance: German gets the data held back from it, then Portuguese is
    added; each step's shifts and saving are shown, and a step the guard refuses stays out of
    service (the demo goes on)."""
    data = Path(recipe_path).parent / "data"
    outcomes = []
    for language, path, add in ((UPDATED, data / f"{UPDATED}-update.jsonl", False),
                                (SPARE, data / f"{SPARE}.jsonl", True)):  # fmt: skip
        say(f"maintenance: {'adding' if add else 'updating'} {language} with {path.name}")
        try:
            outcome = update(recipe_path, language, path, add=add, progress=progress, say=say)
        except GuardError as e:
            outcome = e.outcome
            say(f"the guard kept the new merge out of service: {e}")
        show(outcome)
        outcomes.append(outcome)
    return outcomes
