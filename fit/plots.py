"""PNG figures for `kdcache fit`, `plan` and `cost` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LinearSegmentedColormap, LogNorm
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator

from kdcache.fit.errors import FitError
from kdcache.fit.flops import training_flops
from kdcache.fit.laws import DistillationLaw, SupervisedLaw
from kdcache.fit.presets import PAPER_DISTILLATION, SUPERVISED_PRESETS


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
    """GPU-hours for M = 1..len students, online against cache."""
    m = np.arange(1, len(online) + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(m, online, marker="o", label="online (teacher forward every step)")
    ax.plot(m, cache, marker="s", label="cache (one teacher pass + store)")
    ax.set(xlabel="number of students M", ylabel="GPU-hours", title="Online versus cached distillation")
    ax.legend()
    _save(fig, path)


# -- figures of a run's own data with the laws over it (`kdcache run`'s report) --------------

PAPER_LABEL = "paper's law (not fitted here)"
KIND_MARKERS = {"supervised": "o", "teacher": "*", "distill": "^", "online": "D"}
KIND_LABELS = {"supervised": "supervised student", "teacher": "teacher (own training run)",
               "distill": "distilled from a store", "online": "distilled online"}
TEACHER_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
AXIS_FACTOR = 3.0  # curves and predictions widen an axis at most this factor beyond the data
MAX_SIZES = 6  # student sizes given curves (and named in a legend; beyond, a colour bar)
MAX_TEACHERS = 4  # teachers' L_T given distillation curves in loss_vs_tokens


def _columns(runs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Plain arrays of a runs mapping: kind (str), params, tokens, loss and teacher_loss (NaN if absent)."""
    loss = np.asarray(runs.get("loss", []), dtype=np.float64)
    out = {key: np.asarray(runs.get(key, np.full(len(loss), np.nan)), dtype=np.float64)
           for key in ("params", "tokens", "teacher_loss")}
    out["loss"] = loss
    out["kind"] = np.asarray(runs.get("kind", ["supervised"] * len(loss)), dtype=str)
    for key, value in out.items():
        if len(value) != len(loss):
            raise FitError(f"runs for a figure: column '{key}' has {len(value)} values, 'loss' {len(loss)}")
    return out


def _or_paper(supervised: SupervisedLaw | None, distillation: DistillationLaw | None) -> tuple[
        SupervisedLaw, str, DistillationLaw, str]:
    """The laws to draw and their labels: a law not fitted is the paper's, and says so."""
    sup = (supervised, "fitted supervised law") if supervised else (SUPERVISED_PRESETS["paper"], PAPER_LABEL)
    dist = (distillation, "fitted distillation law") if distillation else (PAPER_DISTILLATION, PAPER_LABEL)
    return sup[0], sup[1], dist[0], dist[1]


def _size_colours(sizes: Sequence[float]) -> dict[float, Any]:
    """A colour per size, by log N over the sizes given (the same runs give the same colours)."""
    ordered = sorted(set(sizes))
    if not ordered:
        return {}
    lo, hi = np.log(ordered[0]), np.log(ordered[-1])
    cmap = plt.get_cmap("viridis")
    return {n: cmap(0.9 * (np.log(n) - lo) / (hi - lo) if hi > lo else 0.4) for n in ordered}


def _spread(values: Sequence[float], most: int) -> list[float]:
    """Up to `most` of the distinct values, evenly by rank, both ends kept: whom to draw curves for."""
    ordered = sorted(set(values))
    if len(ordered) <= most:
        return ordered
    return [ordered[i] for i in sorted(set(np.round(np.linspace(0, len(ordered) - 1, most)).astype(int)))]


def _size_key(fig: Any, ax: Any, colours: dict[float, Any], drawn: Sequence[float]) -> list[Any]:
    """Legend entries naming each size, or, past MAX_SIZES sizes, a colour bar and one entry
    saying how many of them have curves."""
    if len(colours) <= MAX_SIZES:
        return [Line2D([], [], color=c, lw=2, label=f"N = {n:.3g} params") for n, c in colours.items()]
    lo, hi = min(colours), max(colours)
    # The part of viridis _size_colours uses, from log N = lo to hi.
    cmap = LinearSegmentedColormap.from_list("sizes", [plt.get_cmap("viridis")(x)
                                                       for x in np.linspace(0, 0.9, 32)])
    bar = plt.cm.ScalarMappable(norm=LogNorm(lo, hi), cmap=cmap)
    fig.colorbar(bar, ax=ax, label="student size N (params)")
    return [Line2D([], [], ls="", label=f"curves at {len(drawn)} of {len(colours)} sizes")]


def _finite(values: Any) -> np.ndarray:
    """The finite numbers of an array, or of a list of arrays of any lengths, flattened."""
    parts = values if isinstance(values, list | tuple) else [values]
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in parts] or [np.array([])])
    return flat[np.isfinite(flat)]


def _limits(data: Any, extra: Any = ()) -> tuple[float, float] | None:
    """Axis limits holding the data and whatever of `extra` lies within AXIS_FACTOR of it."""
    d = _finite(data)
    if not d.size:
        e = _finite(extra)
        return (float(e.min()) * 0.97, float(e.max()) * 1.03) if e.size else None
    lo, hi = float(d.min()), float(d.max())
    e = _finite(extra)
    e = e[(e >= lo / AXIS_FACTOR) & (e <= hi * AXIS_FACTOR)]
    if e.size:
        lo, hi = min(lo, float(e.min())), max(hi, float(e.max()))
    pad = 0.04 * (hi - lo) or 0.05 * abs(hi) or 0.1
    return lo - pad, hi + pad


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _kind_handles(kinds: Any) -> list[Any]:
    return [Line2D([], [], ls="", marker=KIND_MARKERS[k], color="0.35", label=KIND_LABELS[k])
            for k in KIND_MARKERS if k in set(kinds)]


def loss_vs_tokens(
    runs: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    supervised: SupervisedLaw | None = None,
    distillation: DistillationLaw | None = None,
    teachers: Mapping[str, float] | None = None,
) -> tuple[str, ...]:
    """Loss against training tokens per student size: the runs and the laws' curves through them.

    Left, supervised runs (teachers' own runs as stars) with the supervised law's curve per
    size; right, distilled runs with the distillation law's curve per size at each teacher's
    L_T (`teachers`: name -> L_T; default the distinct L_T of the runs), the supervised curve
    of the same size faint for reference. A law passed as None is drawn as the paper's and
    labelled so. Curves are drawn for at most MAX_SIZES sizes and MAX_TEACHERS teachers
    (spread over the range; the legend says so), so runs of many sizes stay readable.
    Returns the legend entries.
    """
    r = _columns(runs)
    sup, sup_label, dist, dist_label = _or_paper(supervised, distillation)
    is_sup = np.isin(r["kind"], ("supervised", "teacher"))
    is_dist = np.isin(r["kind"], ("distill", "online")) & np.isfinite(r["teacher_loss"])
    if teachers is None:
        teachers = {f"L_T {lt:.3f}": float(lt) for lt in np.unique(r["teacher_loss"][is_dist])}
    shown_lt = _spread(list(teachers.values()), MAX_TEACHERS)
    drawn_teachers = {name: lt for name, lt in teachers.items() if lt in shown_lt}
    colours = _size_colours(r["params"][is_sup | is_dist].tolist())
    tokens = _finite(r["tokens"][is_sup | is_dist])
    grid = np.geomspace(tokens.min() / 1.5, tokens.max() * 1.5, 200) if tokens.size else np.array([])
    sup_sizes = _spread(r["params"][is_sup].tolist(), MAX_SIZES)
    # Sizes times teachers: keep the right panel's curves to about MAX_SIZES * 2.
    dist_sizes = _spread(r["params"][is_dist].tolist(), max(1, 2 * MAX_SIZES // max(len(drawn_teachers), 1)))
    fig, (ax_s, ax_d) = plt.subplots(1, 2, figsize=(12.5, 5), sharey=True)
    curves = []
    styles = dict(zip(drawn_teachers, TEACHER_STYLES * len(drawn_teachers), strict=False))
    with np.errstate(all="ignore"):
        for n in sup_sizes:
            y = np.asarray(sup.loss(n, grid))
            ax_s.plot(grid, y, color=colours[n], lw=1.5)
            curves.append(y)
        for n in dist_sizes:
            ax_d.plot(grid, np.asarray(sup.loss(n, grid)), color=colours[n], lw=1, alpha=0.35)
            for name, lt in drawn_teachers.items():
                y = np.asarray(dist.loss(n, grid, lt))
                ax_d.plot(grid, y, color=colours[n], ls=styles[name], lw=1.5)
                curves.append(y)
    for ax, mask in ((ax_s, is_sup), (ax_d, is_dist)):
        for kind in KIND_MARKERS:
            m = mask & (r["kind"] == kind)
            ax.scatter(r["tokens"][m], r["loss"][m], c=[colours[n] for n in r["params"][m]],
                       marker=KIND_MARKERS[kind], s=70 if kind == "teacher" else 28, edgecolors="k",
                       linewidths=0.4, zorder=3)
        if not mask.any():
            _no_data(ax, "no runs")
        if tokens.size:  # both panels over the same tokens, data or not (a log axis needs limits)
            ax.set(xscale="log", xlim=(grid[0], grid[-1]))
            ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # labelled, 2-9 would overlap
        ax.set_xlabel("training tokens D")
    limits = _limits(r["loss"][is_sup | is_dist], curves)
    if limits:
        ax_s.set_ylim(*limits)
    size_handles = _size_key(fig, ax_d, colours, sorted({*sup_sizes, *dist_sizes}))
    sup_handles = [Line2D([], [], color="0.35", lw=1.5, label=f"{sup_label} (Eq. 1)")]
    dist_handles = [Line2D([], [], color="0.35", ls=styles[name], lw=1.5,
                           label=f"{dist_label} (Eq. 8), {name}") for name in drawn_teachers]
    if len(drawn_teachers) < len(teachers):
        dist_handles.append(Line2D([], [], ls="", label=f"curves at {len(drawn_teachers)} of "
                                                        f"{len(teachers)} teachers' L_T"))
    dist_handles.append(Line2D([], [], color="0.35", lw=1, alpha=0.35, label="supervised law, same N"))
    left = [*_kind_handles(r["kind"][is_sup]), *size_handles, *sup_handles]
    right = [*_kind_handles(r["kind"][is_dist]), *dist_handles]
    ax_s.legend(handles=left, fontsize=7, loc="upper right")
    ax_d.legend(handles=right, fontsize=7, loc="upper right")
    ax_s.set(ylabel="validation loss (nats/token)", title="Supervised runs and the supervised law")
    ax_d.set(title="Distilled runs (lambda = 1) and the distillation law per teacher L_T")
    _save(fig, path)
    return tuple(str(h.get_label()) for h in [*left, *right])


def capacity_gap_runs(
    runs: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    supervised: SupervisedLaw | None = None,
    distillation: DistillationLaw | None = None,
) -> tuple[str, ...]:
    """Student loss against teacher loss L_T (the capacity gap), from the run's distilled students.

    Per student size, the runs at its largest token budget are drawn solid with the
    distillation law's curve L_S(N, D, L_T) over L_T, and the loss of the same student
    trained supervised (the mean of supervised runs at equal N and D, else the supervised
    law's value) as a dotted line; runs at smaller budgets are faded. Curves and lines for
    at most MAX_SIZES sizes (spread over the range). Returns the legend entries.
    """
    r = _columns(runs)
    sup, sup_label, dist, dist_label = _or_paper(supervised, distillation)
    is_dist = np.isin(r["kind"], ("distill", "online")) & np.isfinite(r["teacher_loss"])
    is_twin = r["kind"] == "supervised"
    lt = _finite(r["teacher_loss"][is_dist])
    fig, ax = plt.subplots(figsize=(8, 5.2))
    sizes = sorted(set(r["params"][is_dist].tolist()))
    drawn = _spread(sizes, MAX_SIZES)
    colours = _size_colours(_finite(r["params"]).tolist())  # as in loss_vs_tokens, given the same runs
    handles: list[Any] = []
    curves: list[Any] = []
    grid = np.array([])
    if lt.size:
        span = max(float(lt.max() - lt.min()), 0.05 * float(lt.max()))
        grid = np.linspace(max(float(lt.min()) - 0.3 * span, 1e-3), float(lt.max()) + 0.3 * span, 300)
        ax.plot(grid, grid, "k--", lw=0.8)
        handles.append(Line2D([], [], color="k", ls="--", lw=0.8, label="L_S = L_T"))
    for n in sizes:
        at = is_dist & (r["params"] == n)
        d_max = float(r["tokens"][at].max())
        top = at & (r["tokens"] == d_max)
        for kind in ("distill", "online"):
            for mask, alpha in ((top, 1.0), (at & ~top, 0.35)):
                m = mask & (r["kind"] == kind)
                ax.scatter(r["teacher_loss"][m], r["loss"][m], color=colours[n], marker=KIND_MARKERS[kind],
                           alpha=alpha, s=30, edgecolors="k", linewidths=0.4 * alpha, zorder=3)
        if n not in drawn:
            continue
        with np.errstate(all="ignore"):
            y = np.asarray(dist.loss(n, d_max, grid))
        ax.plot(grid, y, color=colours[n], lw=1.5)
        curves.append(y)
        twins = r["loss"][is_twin & (r["params"] == n) & (r["tokens"] == d_max)]
        ref, ref_label = ((float(twins.mean()), "supervised run") if twins.size
                          else (float(sup.loss(n, d_max)), f"supervised, {sup_label}"))
        ax.axhline(ref, color=colours[n], ls=":", lw=1.2)
        curves.append([ref])
        handles.append(Line2D([], [], color=colours[n], lw=1.5,
                              label=f"N = {n:.3g}, D = {d_max:.3g} (dotted: {ref_label})"))
    if sizes:
        law_label = f"solid: {dist_label} (Eq. 8) at that N, D"
        handles.append(Line2D([], [], color="0.35", lw=1.5, label=law_label))
        if len(drawn) < len(sizes):
            handles.append(Line2D([], [], ls="", label=f"curves at {len(drawn)} of {len(sizes)} sizes"))
            _size_key(fig, ax, colours, drawn)
    else:
        _no_data(ax, "no distilled runs")
    limits = _limits(r["loss"][is_dist], curves)
    if limits:
        ax.set_ylim(*limits)
    handles = [*_kind_handles(r["kind"][is_dist]), *handles]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set(xlabel="teacher loss L_T (teacher's cross-entropy on the valid split)",
           ylabel="student loss L_S",
           title="Capacity gap: runs at each size's largest budget D and the law there;\n"
                 "runs at smaller budgets faded")
    _save(fig, path)
    return tuple(str(h.get_label()) for h in handles)


def relative_errors(observed: Any, predicted: Any) -> tuple[float, float] | None:
    """(mean, max) of |predicted - observed| / observed over the pairs with a prediction; None if none."""
    obs, pred = np.asarray(observed, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    ok = np.isfinite(obs) & np.isfinite(pred)
    if not ok.any():
        return None
    rel = np.abs(pred[ok] - obs[ok]) / obs[ok]
    return float(rel.mean()), float(rel.max())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Agreement:
    """One law's predictions next to the observed losses of the runs it describes.

    `held_out` marks the runs the extrapolation check left out (loss below `threshold`);
    `extrapolated` is the prediction for them of the fit made without them (NaN elsewhere,
    or everywhere when the check did not run).
    """

    title: str
    observed: np.ndarray
    predicted: np.ndarray
    held_out: np.ndarray
    extrapolated: np.ndarray
    threshold: float | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.observed), len(self.predicted), len(self.held_out), len(self.extrapolated)}
        if len(sizes) != 1:
            raise FitError(f"{self.title}: observed, predicted, held_out and extrapolated differ in length")

    @classmethod
    def of_law(
        cls, title: str, law: SupervisedLaw | DistillationLaw, runs: Mapping[str, Any]
    ) -> Agreement:
        """A law's predictions for `runs` (params, tokens, loss; teacher_loss for Eq. 8), none held out."""
        r = _columns(runs)
        with np.errstate(all="ignore"):
            if isinstance(law, DistillationLaw):
                pred = np.asarray(law.loss(r["params"], r["tokens"], r["teacher_loss"]), dtype=np.float64)
            else:
                pred = np.asarray(law.loss(r["params"], r["tokens"]), dtype=np.float64)
        n = len(r["loss"])
        return cls(title=title, observed=r["loss"], predicted=np.atleast_1d(pred),
                   held_out=np.zeros(n, dtype=bool), extrapolated=np.full(n, np.nan))

    def errors(self) -> dict[str, tuple[float, float] | None]:
        """(mean, max) relative error of the full fit on its fitted runs, and of the held-out
        runs' extrapolated predictions (the check's figures)."""
        fitted = ~self.held_out
        return {"fitted": relative_errors(self.observed[fitted], self.predicted[fitted]),
                "held_out": relative_errors(self.observed[self.held_out], self.extrapolated[self.held_out])}


def _pct(errors: tuple[float, float] | None) -> str:
    return f"mean {100 * errors[0]:.2f}%, max {100 * errors[1]:.2f}% rel. error" if errors else "no runs"


def predicted_vs_observed(panels: Sequence[Agreement], path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Predicted against observed loss, one panel per law, with the y = x line.

    Fitted runs are dots at the full fit's prediction; held-out runs are crosses at the
    prediction of the fit made without them (their extrapolation), or, where the check did
    not run, hollow at the full fit's. Predictions beyond AXIS_FACTOR of the data are left
    off the axes and counted in the legend. Returns the legend entries.
    """
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6 * max(len(panels), 1), 5.2), squeeze=False)
    labels: list[str] = []
    for ax, p in zip(axes[0], panels, strict=False):
        err = p.errors()
        fitted, held = ~p.held_out, p.held_out
        checked = held & np.isfinite(p.extrapolated)
        unchecked = held & ~np.isfinite(p.extrapolated)
        limits = _limits(p.observed, [p.predicted, p.extrapolated])
        series = [(fitted, p.predicted, "o", "tab:blue",
                   f"fitted runs ({int(fitted.sum())}): {_pct(err['fitted'])}")]
        below = f"loss < {p.threshold:.4g}" if p.threshold is not None else "held out"
        series.append((checked, p.extrapolated, "X", "tab:red",
                       f"held out ({below}, {int(checked.sum())}), refit's extrapolation: "
                       f"{_pct(err['held_out'])}"))
        series.append((unchecked, p.predicted, "o", "none",
                       f"held out ({below}, {int(unchecked.sum())}): check not run, full fit's prediction"))
        off = 0
        for mask, pred, marker, face, label in series:
            if not mask.any():
                continue
            x, y = p.observed[mask], pred[mask]
            shown = np.isfinite(y) & (y >= limits[0]) & (y <= limits[1]) if limits else np.isfinite(y)
            off += int((~shown).sum())
            ax.scatter(x[shown], y[shown], marker=marker, s=32, facecolors=face,
                       edgecolors="tab:red" if face == "none" else "k", linewidths=0.5, label=label, zorder=3)
        if limits:
            ax.plot(limits, limits, "k--", lw=1, label="y = x (perfect prediction)")
            ax.set(xlim=limits, ylim=limits)
        else:
            _no_data(ax, "no runs")
        if off:
            ax.scatter([], [], marker="", label=f"{off} predictions off the axes")
        ax.set(xlabel="observed loss (nats/token)", ylabel="predicted loss", title=p.title)
        handles, names = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="lower right")  # points lie along y = x: that corner is free
        labels += names
    _save(fig, path)
    return tuple(labels)
