"""The README's library example runs as written (so the documentation cannot rot)."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.slow  # trains and transfers a full-size ResNet pair
def test_readme_python_example_runs():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 100)
    assert namespace["report"].copied["params/stem/conv/kernel"] == "params/stem/conv/kernel"
    assert float(namespace["loss"]) > 0
    assert set(namespace["spikes"].ravel().tolist()) <= {0.0, 1.0}
