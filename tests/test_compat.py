"""Work-arounds for the oldest supported transformers (patch_training/compat.py). The end-to-end case, a
2-process CPU run carrying its optimizer state into the token stage under transformers 5.17, is
tests/test_multiprocess.py::test_ddp_continued_switch_carries_the_optimizer_state."""

from __future__ import annotations

import io

import pytest
import torch
import transformers
from packaging.version import Version

from patch_training import compat


@pytest.mark.parametrize("location", ["cpu:0", "cpu:1"])
def test_an_indexed_cpu_location_loads(location):
    """An AdamW state saved on the CPU loads with map_location "cpu:N" (transformers 5.17's choice for a
    multi-process CPU run), equal to the saved one; other locations are left to torch."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    compat.register_indexed_cpu()
    compat.register_indexed_cpu()  # idempotent
    buffer.seek(0)
    loaded = torch.load(buffer, map_location=location, weights_only=True)
    for key, value in optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(loaded["state"][0][key], value, rtol=0, atol=0)
        assert loaded["state"][0][key].device.type == "cpu"
    assert compat._restore_indexed_cpu(object(), "cuda:0") is None
    assert compat._restore_indexed_cpu(object(), "cpu:x") is None


def test_installed_only_where_needed():
    """The work-around is installed on transformers older than the release that fixed the bug, not after."""
    needed = Version(transformers.__version__).release < Version(compat.CPU_MAP_LOCATION_FIXED_IN).release
    assert compat.install() is needed


@pytest.mark.parametrize("installed, version, expected",
                         [("5.17.0", "5.18", False), ("5.18.0.dev0", "5.18", True), ("5.18.0", "5.18", True),
                          ("5.24.0", "5.23", True), ("5.9.1", "5.18", False), ("5.17.0", "0", True)])
def test_transformers_at_least_compares_releases(monkeypatch, installed, version, expected):
    """By release numbers: a development build of 5.18 already has 5.18's fixes; 5.9 is older than 5.18."""
    monkeypatch.setattr(transformers, "__version__", installed)
    assert compat.transformers_at_least(version) is expected
