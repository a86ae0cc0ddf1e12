"""The prepare tests' corpus: documents each carrying a unique marker word."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu"]


def _docs(n: int) -> list[str]:
    """Documents that each carry a unique marker word, so a split's text names its documents."""
    rng = np.random.default_rng(0)
    return [
        " ".join([f"doc{i:03d}x", *(WORDS[j] for j in rng.integers(0, len(WORDS), 200)), f"doc{i:03d}x"])
        for i in range(n)
    ]


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    """40 documents of marker words, half of them in a subfolder."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, text in enumerate(_docs(40)):
        (root / ("sub" if i % 2 else ".") / f"{i:03d}.txt").write_text(text)
    return root
