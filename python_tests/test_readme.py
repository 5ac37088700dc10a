"""The README's usage example runs as written and gives what its comments say."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    keep, picks, count = scope["keep"], scope["picks"], scope["count"]
    assert keep.shape == (2, 64) and keep.dtype == torch.int64
    assert bool((keep[:, 1:] > keep[:, :-1]).all())  # sorted and distinct
    assert picks.shape == (2, 32) and count.tolist() == [32, 32]
    assert scope["diverse"].shape == (2, 64) and scope["more"].shape == (2, 32)
    # FPS seeded by the cover picks never returns one of them.
    for row in range(2):
        assert not set(scope["more"][row].tolist()) & set(picks[row].tolist())
    for name, k in (("by_diversity", 64), ("by_dpp", 64), ("by_d2", 64), ("role", 64), ("stage", 288)):
        got = scope[name]
        assert got.shape == (2, k), (name, got.shape)
        if name != "role":
            assert bool((got[:, 1:] > got[:, :-1]).all()), name
