"""PNG figures for `kdcache fit`, `plan` and `cost` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from kdcache.fit.flops import training_flops
from kdcache.fit.laws import DistillationLaw, SupervisedLaw


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fit_vs_data(
    law: SupervisedLaw | DistillationLaw,
    data: dict[str, list[float]],
    threshold: float,
    path: str | os.PathLike[str],
) -> None:
    """Measured against predicted loss per run, with the held-out (extrapolated) region shaded."""
    n, d, loss = (np.asarray(data[k]) for k in ("params", "tokens", "loss"))
    if isinstance(law, DistillationLaw):
        pred = np.asarray(law.loss(n, d, np.asarray(data["teacher_loss"])))
        title = "Distillation law (Eq. 8)"
    else:
        pred = np.asarray(law.loss(n, d))
        title = "Supervised law (Eq. 1)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    lo, hi = min(loss.min(), pred.min()) * 0.98, max(loss.max(), pred.max()) * 1.02
    for ax in (ax1,):
        ax.axvspan(lo, threshold, color="tab:orange", alpha=0.15, label=f"held out (loss < {threshold:.3g})")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect fit")
        ax.scatter(loss, pred, s=10, c=np.log10(n), cmap="viridis")
        ax.set(
            xlabel="measured loss (nats/token)",
            ylabel="predicted loss",
            title=title,
            xlim=(lo, hi),
            ylim=(lo, hi),
        )
        ax.legend(loc="upper left")
    flops = training_flops(n, d)
    sc = ax2.scatter(flops, 100 * (pred - loss) / loss, s=10, c=np.log10(n), cmap="viridis")
    ax2.axhline(0, color="k", lw=1)
    ax2.set(xscale="log", xlabel="training FLOPs 3F(N)D", ylabel="relative error (%)", title="Residuals")
    fig.colorbar(sc, ax=ax2, label="log10 params")
    _save(fig, path)


def capacity_gap(law: DistillationLaw, students: Sequence[float], path: str | os.PathLike[str]) -> None:
    """Student loss against teacher loss for fixed students at 20 tokens/param: the capacity gap."""
    lt = np.linspace(law.supervised.E + 0.3, 4.0, 400)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for n in students:
        line = ax.plot(lt, law.loss(n, 20 * n, lt), label=f"student {n:.3g} params")[0]
        ax.axhline(law.supervised.loss(n, 20 * n), color=line.get_color(), ls=":", lw=1)
    ax.plot(lt, lt, "k--", lw=1, label="L_S = L_T")
    ax.set(
        xlabel="teacher loss L_T",
        ylabel="student loss L_S",
        title="Capacity gap, students at 20 tokens/param\n(dotted: the same student trained supervised)",
    )
    ax.legend()
    _save(fig, path)


def allocations(
    recipes: dict[str, list[dict[str, Any]]], path: str | os.PathLike[str], title: str = ""
) -> None:
    """Compute-optimal student tokens, teacher size and student loss against compute, per scenario."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    fig.suptitle(title)
    for scenario, rs in recipes.items():
        c = [r["compute"] for r in rs]
        axes[0].plot(c, [r["student_tokens"] for r in rs], marker=".", label=scenario)
        axes[1].plot(c, [r["teacher_params"] or np.nan for r in rs], marker=".", label=scenario)
        axes[2].plot(c, [r["student_loss"] for r in rs], marker=".", label=scenario)
    first = next(iter(recipes.values()))
    axes[2].plot(
        [r["compute"] for r in first], [r["supervised_loss"] for r in first], "k--", label="supervised"
    )
    titles = ("student tokens D_S*", "teacher params N_T* (best: supervised-optimal)", "student loss")
    for ax, name in zip(axes, titles, strict=True):
        ax.set(xscale="log", xlabel="compute (FLOPs)", title=name)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    _save(fig, path)


def cost_vs_students(online: Sequence[float], cache: Sequence[float], path: str | os.PathLike[str]) -> None:
    """Money for M = 1..len students, online against cache."""
    m = np.arange(1, len(online) + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(m, online, marker="o", label="online (teacher forward every step)")
    ax.plot(m, cache, marker="s", label="cache (one teacher pass + store)")
    ax.set(xlabel="number of students M", ylabel="cost (USD)", title="Online versus cached distillation")
    ax.legend()
    _save(fig, path)
