"""The README's five-minute quickstart runs as written (plain Keras, on real Fashion-MNIST)."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from bnutils.data import DatasetError, load_dataset

README = Path(__file__).resolve().parent.parent / "README.md"


def _quickstart_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("## BN in Keras 3 in five minutes")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_quickstart_has_its_code_blocks():
    blocks = _quickstart_blocks()
    assert len(blocks) == 3, f"expected model, inference and fine-tuning blocks, got {len(blocks)}"
    assert "import bnutils" not in "".join(blocks), "the quickstart is plain Keras"


@pytest.mark.slow
def test_quickstart_runs(monkeypatch):
    try:  # real images, offline; 24,000 give the moving averages (momentum 0.99) 338 steps
        ds = load_dataset("fashion_mnist", scale="raw", download=False)
    except DatasetError as e:
        pytest.skip(f"Fashion-MNIST is not on this machine: {e}")
    subset = (
        (ds.x_train[:24000, ..., 0], ds.y_train[:24000].astype("uint8")),
        (ds.x_test[:512, ..., 0], ds.y_test[:512].astype("uint8")),
    )
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: subset)
    namespace: dict = {}
    for block in _quickstart_blocks():
        exec(compile(block, str(README), "exec"), namespace)  # an assert in a block can fail
    model = namespace["model"]
    assert model.evaluate(namespace["x_test"], namespace["y_test"], verbose=0)[1] > 0.6
    assert all(not layer.trainable for layer in namespace["bns"])
    assert np.isfinite(namespace["probs"]).all()
