"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_the_merge_functions_example_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [b for b in blocks if "merge_deltas(" in b]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102
    B, A = namespace["B"], namespace["A"]
    assert B.shape == (64, 8) and A.shape == (8, 32)  # rank Σrᵢ, exactly the regmean ΔW
