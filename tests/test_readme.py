"""The Python example of docs/merging.md runs as written."""

import re
from pathlib import Path

MERGING = Path(__file__).parents[1] / "docs" / "merging.md"


def test_the_merge_functions_example_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", MERGING.read_text(), re.S)
    (example,) = [b for b in blocks if "merge_deltas(" in b]
    namespace: dict = {}
    exec(compile(example, "docs/merging.md", "exec"), namespace)  # noqa: S102
    B, A = namespace["B"], namespace["A"]
    assert B.shape == (64, 8) and A.shape == (8, 32)  # rank Σrᵢ, exactly the regmean ΔW
