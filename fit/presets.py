"""Published coefficients usable without fitting, and loading a law from a fit's JSON.

`paper`: Busbridge et al. 2025, Table 6 (supervised and distillation).
`chinchilla`: Hoffmann et al. 2022, Approach 3 (gamma = 1).
`epoch`: Besiroglu et al. 2024, the refit of Chinchilla's data (gamma = 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcache.fit.errors import FitError
from kdcache.fit.laws import DistillationLaw, SupervisedLaw

SUPERVISED_PRESETS = {
    "paper": SupervisedLaw(E=1.220, A=3355.0, B=18186.0, alpha=0.408, beta=0.431, gamma=0.452),
    "chinchilla": SupervisedLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, gamma=1.0),
    "epoch": SupervisedLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, gamma=1.0),
}

PAPER_DISTILLATION = DistillationLaw(
    A=2243.0,
    B=24181.0,
    alpha=0.321,
    beta=0.637,
    gamma=0.764,
    c0=2.549,
    c1=522.6,
    f1=0.090,
    d1=1.315,
    supervised=SUPERVISED_PRESETS["paper"],
)


def read_fit_json(spec: str) -> dict[str, Any]:
    """A `kdcache fit --json` file as a dict with a 'params' object (FitError naming the file)."""
    path = Path(spec)
    if not path.is_file():
        names = ", ".join(SUPERVISED_PRESETS)
        raise FitError(f"{spec}: neither a preset ({names}) nor a fit JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FitError(f"{path}: not a readable fit JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise FitError(f"{path}: fit JSON needs a 'params' object")
    return data


def load_supervised(spec: str) -> SupervisedLaw:
    """A supervised law from a preset name or a `kdcache fit --json` file (either law)."""
    if spec in SUPERVISED_PRESETS:
        return SUPERVISED_PRESETS[spec]
    data = read_fit_json(spec)
    params = data["supervised"] if data.get("law") == "distillation" else data["params"]
    return SupervisedLaw.from_dict(params)


def load_distillation(spec: str) -> DistillationLaw:
    """A distillation law from `paper` or a `kdcache fit --law distillation --json` file."""
    if spec == "paper":
        return PAPER_DISTILLATION
    if spec in SUPERVISED_PRESETS:
        raise FitError(f"preset '{spec}' has only a supervised law; use 'paper' or a fit JSON")
    data = read_fit_json(spec)
    if data.get("law") != "distillation" or not isinstance(data.get("supervised"), dict):
        raise FitError(f"{spec}: not a distillation fit (need law 'distillation' and 'supervised')")
    return DistillationLaw.from_dict(data["params"], SupervisedLaw.from_dict(data["supervised"]))
