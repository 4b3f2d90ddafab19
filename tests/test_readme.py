"""Every Python example of the README runs as written, each on its own (a fresh namespace per snippet)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples() -> None:
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int) -> None:
    code = SNIPPETS[index]
    needs = [m for m in ("timm", "transformers") if re.search(rf"^\s*(import|from) {m}\b", code, flags=re.M)]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"snippet {index} needs {module} (make test-timm runs the timm one)")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": f"readme_{index}"})
    finally:
        torch.set_num_threads(threads)
