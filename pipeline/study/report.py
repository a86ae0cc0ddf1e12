"""One self-contained HTML page summarising the output directory of `kdcache run`.

`write_report(OUT)` reads what the run left in OUT (its layout: `layout.py`), builds one
page with a section per part, and writes `OUT/report.html`. The page has inline CSS, no
scripts and no external resources (plots are base64 PNG data URIs), so it can be attached
to a CI run or mailed as one file. A run interrupted early leaves parts missing: each
section shows what exists and says plainly, in a `class="missing"` note, what does not.

Readers turn files into plain dicts; section functions turn dicts into HTML strings.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcache.fit.presets import PAPER_DISTILLATION, SUPERVISED_PRESETS
from kdcache.pipeline.study.layout import RunLayout
from kdcache.pipeline.study.summary import summary_lines
from kdcache.storage import summarize
from kdcache.storage.model_record import ModelRecord, read_model_record
from kdcache.storage.runs import read_runs as read_table
from kdcache.storage.tokens.format import open_token_data

TEACHER_PREFIX = "teacher-"  # run_id prefix of the teachers' own supervised rows
DASH = "—"
Row = Mapping[str, Any]
Column = tuple[str, str, Callable[[Any], str]]  # (key, possibly dotted; header; formatter)

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1200px;
       color: #222; }
.scroll { overflow-x: auto; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; white-space: nowrap; } th { background: #f3f3f3; }
td { text-align: right; font-variant-numeric: tabular-nums; } td:first-child { text-align: left; }
.missing { color: #a40; font-weight: 600; } .note { color: #555; font-style: italic; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; }
#findings td { white-space: normal; text-align: left; max-width: 520px; }
pre.headline { background: #f6f8fa; padding: 0.8em 1em; white-space: pre-wrap; }
"""


# -- formatting -----------------------------------------------------------------------


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(spec: str) -> Callable[[Any], str]:
    """A formatter: `format(value, spec)`, a dash for None/NaN, text left as it is."""

    def apply(value: Any) -> str:
        if _blank(value):
            return DASH
        if isinstance(value, bool):
            return "yes" if value else "no"
        return format(value, spec) if isinstance(value, int | float) else str(value)

    return apply


TEXT, INT, SCI, LOSS, SHORT = fmt(""), fmt(",.0f"), fmt(".3g"), fmt(".4f"), fmt(".1f")
COEF = fmt(".5g")  # the paper's coefficients in full (B = 18186), fitted ones alike


def _count(value: Any) -> str:
    """Params and tokens: exact up to millions, then 3 significant digits (1.23e+09)."""
    big = isinstance(value, int | float) and not _blank(value) and abs(value) >= 1e7
    return SCI(value) if big else INT(value)


COUNT = _count


def _get(row: Row, key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(f(_get(r, key)))}</td>" for key, _, f in columns) + "</tr>"
        for r in rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def missing(text: str) -> str:
    return f'<p class="missing">Missing: {html.escape(text)}</p>'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


# -- readers: one per source; each raises on unreadable input, `load` turns that into a note --


def load(layout: RunLayout, path: Path, reader: Callable[[Path], Any]) -> tuple[Any, str]:
    """(value, "") or (None, a missing/unreadable note): a broken part must not sink the page."""
    rel = layout.rel(path)
    if not path.exists():
        return None, missing(f"{rel} (not written yet)")
    try:
        return reader(path), ""
    except Exception as exc:  # any reader failure is one unreadable part, reported in place
        return None, f'<p class="missing">Unreadable: {html.escape(f"{rel} ({exc})")}</p>'


def load_optional(layout: RunLayout, path: Path, reader: Callable[[Path], Any]) -> tuple[Any, str]:
    """`load` for optional parts (or ones reported elsewhere): absence is no news, breakage is."""
    return load(layout, path, reader) if path.exists() else (None, "")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_list(path: Path) -> list[dict[str, Any]]:
    """plans.json / costs.json: a list of `--json` outputs (one object alone is taken as a list of one)."""
    value = read_json(path)
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError("expected a JSON list of objects")
    return items


def read_runs(path: Path) -> list[dict[str, Any]]:
    return read_table(path, required=()).to_pylist()


def read_model_dirs(path: Path) -> list[tuple[str, ModelRecord | None]]:
    """(name, record) per MODEL directory; the record is None until kdcache.json (written last) exists."""
    return [(d.name, read_model_record(d)) for d in sorted(p for p in path.iterdir() if p.is_dir())]


def read_stores(path: Path) -> list[dict[str, Any]]:
    stores = []
    for d in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            stores.append({"name": d.name, **summarize(d)})
        except Exception as exc:  # a store still being created, or broken: one row says so
            stores.append({"name": d.name, "error": str(exc)})
    return stores


def read_data(path: Path) -> dict[str, Any]:
    return open_token_data(path).meta


def read_plots(path: Path) -> list[tuple[str, str]]:
    pngs = sorted(path.glob(f"*{RunLayout.PNG}"))
    return [(p.stem, base64.b64encode(p.read_bytes()).decode()) for p in pngs]


# -- sections -------------------------------------------------------------------------


def _presence(path: Path, count: bool) -> str:
    if not path.exists():
        return '<span class="missing">missing</span>'
    if count and path.is_dir():
        return f"present ({sum(1 for p in path.iterdir() if p.is_dir() or p.suffix == RunLayout.PNG)})"
    return "present"


def overview_section(layout: RunLayout) -> str:
    """Which parts exist, in one list, so an interrupted run is obvious at the top."""
    items = "".join(
        f"<li><code>{html.escape(layout.rel(path))}</code> {html.escape(what)}: {_presence(path, count)}</li>"
        for path, what, count in layout.parts()
    )
    data, problem = load_optional(layout, layout.data, read_data)  # a missing data/ is in the list already
    if data:
        splits = ", ".join(f"{k} {INT(v.get('rows'))} rows" for k, v in data.get("splits", {}).items())
        problem = note(
            f"Token data: source {data.get('source')}, vocab {data.get('vocab_size')}, "
            f"seq_len {data.get('seq_len')}; {splits}."
        )
    return section("overview", "Contents of the run directory", f"<ul>{items}</ul>", problem)


def teacher_rows(runs: Sequence[Row], dirs: Sequence[tuple[str, ModelRecord | None]],
                 stores: Sequence[Row]) -> list[dict[str, Any]]:
    """Teachers from their runs rows ("teacher-*") and model dirs, matched by run_id or name."""
    by_id = {r["run_id"]: r for r in runs if str(r.get("run_id") or "").startswith(TEACHER_PREFIX)}
    used: defaultdict[str, list[str]] = defaultdict(list)
    for s in stores:
        used[str(_get(s, "metadata.teacher.name"))].append(s["name"])
    rows = []
    for name, record in dirs:
        training = (record.training if record else None) or {}
        ids = (training.get("run_id"), TEACHER_PREFIX + name, name)
        run = next((by_id.pop(i) for i in ids if i in by_id), {})
        row = {**training, **run, "name": name, "model_dir": "yes"}
        row["params"] = row.get("params") or (record.nonembedding_params if record else None)
        rows.append(row)
    rows += [{**r, "name": i.removeprefix(TEACHER_PREFIX), "model_dir": "missing"} for i, r in by_id.items()]
    for row in rows:
        row["stores"] = ", ".join(used.get(row["name"], [])) or None
    return rows


def teachers_section(layout: RunLayout, runs: Sequence[Row] | None, stores: Sequence[Row]) -> str:
    dirs, problem = load(layout, layout.teachers, read_model_dirs)
    rows = teacher_rows(runs or [], dirs or [], stores)
    columns: list[Column] = [
        ("name", "teacher", TEXT), ("run_id", "run", TEXT), ("params", "params N", COUNT),
        ("tokens", "tokens D", COUNT), ("loss", "validation loss", LOSS), ("ece", "ECE", LOSS),
        ("layers", "layers", INT), ("d_model", "d_model", INT), ("stores", "stores", TEXT),
        ("model_dir", "model dir", TEXT),
    ]
    none = note(f"No teachers found in {layout.rel(layout.teachers)}/ or the runs table.")
    body = table(rows, columns) if rows else none
    return section("teachers", "Teachers", problem, body)


def student_pairs(runs: Sequence[Row]) -> list[dict[str, Any]]:
    """Each distill/online run next to the mean of the supervised runs with equal N and D.

    Teachers' own runs are left out: they train on the teacher split, the students' twins
    on the student split, and the comparison is the paper's (same data, with or without KD).
    """
    twins: defaultdict[tuple[Any, Any], list[Row]] = defaultdict(list)
    for r in runs:
        if r.get("kind") == "supervised" and not str(r.get("run_id") or "").startswith(TEACHER_PREFIX):
            twins[(r.get("params"), r.get("tokens"))].append(r)

    def mean(rs: Sequence[Row], key: str) -> float | None:
        values = [r[key] for r in rs if not _blank(r.get(key))]
        return sum(values) / len(values) if values else None

    pairs = []
    for r in runs:
        if r.get("kind") not in ("distill", "online"):
            continue
        sup = twins.get((r.get("params"), r.get("tokens")), [])
        sup_loss = mean(sup, "loss")
        pairs.append({
            **r,
            "store": Path(r["store"]).name if r.get("store") else None,
            "supervised_loss": sup_loss,
            "supervised_ece": mean(sup, "ece"),
            "difference": None if sup_loss is None or _blank(r.get("loss")) else r["loss"] - sup_loss,
        })
    return sorted(pairs, key=lambda p: (p.get("params") or 0, p.get("tokens") or 0, p["run_id"] or ""))


def students_section(runs: Sequence[Row] | None, problem: str) -> str:
    if runs is None:
        return section("students", "Students: distilled versus supervised", problem)
    pairs = student_pairs(runs)
    columns: list[Column] = [
        ("run_id", "run", TEXT), ("kind", "kind", TEXT), ("params", "params N", COUNT),
        ("tokens", "tokens D", COUNT), ("loss", "student loss", LOSS),
        ("supervised_loss", "supervised loss", LOSS), ("difference", "distilled − supervised", LOSS),
        ("teacher_loss", "teacher loss", LOSS), ("store", "store", TEXT), ("k", "k", INT),
        ("ece", "ECE", LOSS), ("supervised_ece", "supervised ECE", LOSS),
    ]
    if not pairs:
        return section("students", "Students: distilled versus supervised",
                       note("The runs table has no distill or online runs yet."))
    unmatched = sum(p["supervised_loss"] is None for p in pairs)
    parts = [
        note("Supervised loss: mean over supervised runs with the same params and tokens; "
             "a negative difference means distillation helped."),
        table(pairs, columns),
    ]
    if unmatched:
        parts.append(note(f"{unmatched} of {len(pairs)} students have no supervised run at equal "
                          "params and tokens."))
    return section("students", "Students: distilled versus supervised", *parts)


LT_HEADER, NLL_HEADER = "L_T (valid CE)", "cached-split NLL"
STORE_LOSSES = (f"{LT_HEADER}: the teacher's cross-entropy on the data's valid split, the one number "
                f"per teacher the distillation law uses. {NLL_HEADER}: the teacher's mean NLL over "
                "the rows this store caches.")


def stores_section(layout: RunLayout, stores: Sequence[Row] | None, problem: str) -> str:
    columns: list[Column] = [
        ("name", "store", TEXT), ("metadata.kind", "kind", TEXT), ("metadata.k", "k", INT),
        ("metadata.teacher.name", "teacher", TEXT), ("rows", "rows", INT), ("tokens", "tokens", INT),
        ("bytes", "bytes on disk", INT), ("bytes_per_token", "bytes/token", SHORT),
        ("metadata.valid_loss", LT_HEADER, LOSS), ("teacher_loss", NLL_HEADER, LOSS),
        ("metadata.complete", "complete", TEXT), ("error", "problem", TEXT),
    ]
    if stores is None:
        return section("stores", "Logit stores", problem)
    if not any(s.get("error") for s in stores):
        columns = columns[:-1]
    if not stores:
        return section("stores", "Logit stores", note(f"{layout.rel(layout.stores)}/ holds no store yet."))
    parts = [table(stores, columns), note(STORE_LOSSES)]
    # valid_loss is written when a store completes: a complete store without it predates the field.
    old = [s["name"] for s in stores
           if _get(s, "metadata.complete") and _blank(_get(s, "metadata.valid_loss"))]
    if old:
        parts.append(note(f"{LT_HEADER} of {', '.join(old)}: not recorded (store predates it; "
                          "rerun kdcache cache to add it)."))
    return section("stores", "Logit stores", *parts)


def fit_block(law: str, fit: Row | None, problem: str, remark: str | None) -> str:
    """Fitted coefficients, their bootstrap intervals and the paper's values, one row each."""
    paper = (SUPERVISED_PRESETS["paper"] if law == "supervised" else PAPER_DISTILLATION).to_dict()
    fit = fit or {}
    fitted, boot = fit.get("params", {}), fit.get("bootstrap") or {}
    level = f"{100 * boot.get('level', 0.9):.0f}% interval"
    rows = []
    for name in [*paper, *(n for n in fitted if n not in paper)]:
        ci = boot.get("intervals", {}).get(name)
        band = "fixed" if name in fit.get("fixed", {}) else f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else None
        rows.append({"name": name, "fitted": fitted.get(name), "band": band, "paper": paper.get(name)})
    parts = [f"<h3>{html.escape(law.capitalize())} law</h3>", problem]
    if remark:
        parts.append(note(remark))
    if fit:
        parts.append(note(_fit_summary(fit)))
    cols: list[Column] = [("name", "coefficient", TEXT), ("fitted", "fitted", COEF),
                          ("band", level, TEXT), ("paper", "paper (Busbridge et al. 2025)", COEF)]
    parts.append(table(rows, cols))
    if fit.get("supervised"):
        used = ", ".join(f"{k}={v:.4g}" for k, v in fit["supervised"].items())
        parts.append(note(f"Supervised law used for Lsup_S: {used}."))
    return "".join(parts)


def _fit_summary(fit: Row) -> str:
    text = (f"Fitted to {fit.get('runs')} runs (Huber delta {fit.get('delta', 0):g}, "
            f"objective {fit.get('objective', math.nan):.4g}).")
    ex = fit.get("extrapolation") or {}
    if ex.get("mean_relative_error") is not None:
        text += (
            f" Extrapolation: fitted on {ex['fitted_runs']} runs with loss >= {ex['threshold']:.4g}, "
            f"{ex['held_out_runs']} held out: mean relative error {100 * ex['mean_relative_error']:.2f}%, "
            f"max {100 * ex['max_relative_error']:.2f}%."
        )
    return text


def fits_section(layout: RunLayout) -> str:
    notes, problem = load_optional(layout, layout.notes, read_json)
    blocks = [problem]
    for law in ("supervised", "distillation"):
        fit, missing_fit = load(layout, layout.fit(law), read_json)
        remark = (notes or {}).get(law)
        # A note saying why a law was not fitted replaces the generic "not written yet".
        blocks.append(fit_block(law, fit, "" if fit is None and remark else missing_fit, remark))
    return section("fits", "Scaling-law fits", *blocks)


def plans_section(layout: RunLayout) -> str:
    plans, problem = load(layout, layout.plans, read_list)
    columns: list[Column] = [
        ("scenario", "scenario", TEXT), ("law", "law", TEXT), ("compute", "compute (FLOPs)", SCI),
        ("student_params", "student N_S", SCI), ("student_tokens", "student D_S", SCI),
        ("teacher_params", "teacher N_T", SCI), ("teacher_tokens", "teacher D_T", SCI),
        ("teacher_loss", "teacher loss", LOSS), ("student_loss", "student loss", LOSS),
        ("supervised_loss", "supervised loss", LOSS), ("distill", "distil?", TEXT),
        ("flops.student_training", "FLOPs student", SCI),
        ("flops.teacher_logits", "FLOPs teacher logits", SCI),
        ("flops.teacher_training", "FLOPs teacher training", SCI),
        ("at_bounds", "at a search bound", TEXT),
    ]
    none = note(f"{layout.rel(layout.plans)} lists no recipes.")
    rows = [{**p, "at_bounds": ", ".join(map(str, p.get("at_bounds") or [])) or None} for p in plans or []]
    body = (note(PLANS_NOTE) + table(rows, columns)) if plans else (problem or none)
    return section("plans", "Compute-optimal recipes", body)


PLANS_NOTE = ("Each recipe names the law it comes from. The fitted law gives a recipe only where it is "
              "identified: no coefficient on its search bound, and the recipe within the range of the runs "
              "it was fitted to (`kdcache plan` refuses otherwise without --extrapolate). Elsewhere the "
              "recipe is the paper's published law's, and the law column says why. A value at a search "
              "bound (1e6 or 1e17) means the optimum lies beyond it.")


def _effects(found: Row) -> str:
    return "; ".join(f"{e['what']}: {e['mean']:+.4f} ± {e['spread'] / 2:.4f} ({e['seeds']} seeds, "
                     f"{'shown' if e['shown'] else 'inside the spread'})" for e in found.get("effects") or [])


def findings_section(layout: RunLayout) -> str:
    """The paper's findings, each reproduced or not by this run's seeds (`findings.py`)."""
    found, problem = load(layout, layout.findings, read_list)
    rows = [{**f, "verdict": f.get("verdict", DASH), "effect": _effects(f) or None} for f in found or []]
    columns: list[Column] = [("claim", "finding (Busbridge et al. 2025)", TEXT),
                             ("verdict", "here", TEXT),
                             ("effect", "effect: mean ± half the seed range", TEXT),
                             ("numbers", "validation losses by condition (mean ± half range)", TEXT)]
    body = (table(rows, columns) + note(
        "Each effect is a difference of validation losses the claim says is positive, taken seed by seed "
        "(same seed, same data order). It is shown when its mean is positive and exceeds its spread (max - "
        "min over seeds); a finding is reproduced when all its effects are shown, not shown otherwise, and "
        "not testable with fewer than 3 seeds.")) if rows else problem
    return section("findings", "The paper's findings at this scale", body)


def costs_section(layout: RunLayout) -> str:
    costs, problem = load(layout, layout.costs, read_list)
    # `kdcache cost --json` does not echo its inputs; show them when the writer added them.
    inputs: list[Column] = [("label", "case", TEXT), ("teacher_params", "teacher N_T", SCI),
                            ("student_params", "student N_S", TEXT), ("tokens", "tokens D", SCI)]
    columns: list[Column] = [c for c in inputs if any(c[0] in r for r in costs or [])] + [
        ("students", "students M", INT), ("bytes_per_token", "bytes/token", SHORT),
        ("store_bytes", "store bytes", SCI), ("online_flops", "online FLOPs", SCI),
        ("cache_flops", "cache FLOPs", SCI), ("online_gpu_hours", "online GPU-h", SCI),
        ("cache_gpu_hours", "cache GPU-h", SCI), ("online_cost", "online $", SCI),  # small runs cost < $0.01
        ("cache_cost", "cache $", SCI), ("storage_cost", "storage $", SCI),
        ("read_bandwidth_needed", "read B/s needed", SCI), ("read_bandwidth_ok", "bandwidth ok", TEXT),
        ("break_even_students", "break-even M", INT),
    ]
    none = note(f"{layout.rel(layout.costs)} lists no estimates.")
    body = table(costs, columns) if costs else (problem or none)
    return section("costs", "Cache versus online distillation: cost", body)


# The run's own data with the fitted laws over it (`plots.write_plots`): shown first, in
# `RunLayout.FIGURES`' order, each with what it draws; other PNGs (fit-*, cost-*) follow under
# their names.
FIGURES = dict(zip(RunLayout.FIGURES, (
    (  # loss-vs-tokens
        "Loss against training tokens",
        "Validation loss of every run of the law grid against its training tokens D (log scale), "
        "coloured by student size N; markers: supervised student, teacher's own training run, "
        "distilled from a store, distilled online. Left: the supervised law (Eq. 1) per size. "
        "Right: the distillation law (Eq. 8) per size at each teacher's L_T (one line style per "
        "teacher), with the same size's supervised curve faint. Read: where a size's distilled markers lie "
        "below its supervised ones, distillation helped at that budget; the laws' lines should pass "
        "through the markers, and where they miss, the law does not describe these runs.",
    ),
    (  # capacity-gap
        "Student loss against teacher loss (capacity gap)",
        "Distilled students' loss L_S against their teacher's L_T (cross-entropy on the valid split). "
        "Per student size, the runs at its largest token budget are solid, with the distillation "
        "law's curve at that N and D and, dotted, the same student trained supervised (the measured "
        "run at equal N and D, else the supervised law); runs at smaller budgets are faded. The "
        "dashed diagonal is L_S = L_T. Read: a curve that turns up toward the left (a stronger teacher, "
        "a worse student) is the capacity gap; points above their dotted supervised line are students "
        "distillation did not help.",
    ),
    (  # predicted-vs-observed
        "Predicted against observed loss",
        "Each law's prediction against the measured loss, per run, with the line y = x. Dots: runs "
        "the law was fitted to, at the full fit's prediction; crosses: runs held out by the "
        "extrapolation check (loss below its threshold), at the prediction of the fit made without "
        "them. The legend gives mean and max relative errors. Read: the crosses say how far to trust a "
        "law beyond its runs; a cross far off the line means extrapolated recipes are guesses.",
    ),
    (  # allocations
        "Compute-optimal recipes against compute",
        "Eq. 10's recipes per scenario for one of this run's student sizes over budgets around "
        "plans.json's: the student's tokens, the teacher's size and the student's loss against "
        "supervised training (dashed). Read: how the best split of compute between teacher and "
        "student moves with the budget, and from which budget supervised training catches up. A fitted "
        "law that is not identified is not drawn (see the recipes' table); the paper's law is drawn "
        "instead, labelled so.",
    ),
), strict=True))
LAW_NOTE = "A law that was not fitted is drawn as the paper's and labelled \"paper's law (not fitted here)\"."


def figure(data: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


COST_CAPTION = ("Cost of distilling M students of this run's sizes from teacher {name}: online (the teacher "
                "runs at every student step) against the cache (one teacher pass, the store, then offline "
                "students), in GPU-hours at the assumed throughput (the store's storage, money rather than "
                "GPU time, is in the cost table). Read: where the lines cross, caching starts to pay.")


def _caption(stem: str) -> str:
    """A caption for a PNG outside FIGURES: the cost plots, else the file name."""
    if stem.startswith("cost-"):
        name = stem.removeprefix("cost-")
        lead = f"Cost against the number of students ({stem}{RunLayout.PNG}). "
        return lead + COST_CAPTION.format(name=name)
    return stem


def plots_section(layout: RunLayout) -> str:
    plots, problem = load(layout, layout.plots, read_plots)
    if plots is None:
        return section("plots", "Plots", problem)
    skipped, broken = load_optional(layout, layout.skipped, read_json)
    found = dict(plots)
    parts = [broken]
    for stem, (title, caption) in FIGURES.items():
        path = layout.figure(stem)
        if stem in found:
            parts.append(figure(found.pop(stem), title, f"{title} ({path.name}). {caption}"))
        elif isinstance(skipped, dict) and path.name in skipped:
            parts.append(note(f"Not drawn: {path.name} ({skipped[path.name]})."))
        else:
            parts.append(missing(f"{layout.rel(path)} (not drawn yet)"))
    if len(found) < len(plots):
        parts.append(note(LAW_NOTE))
    parts += [figure(data, stem, _caption(stem)) for stem, data in found.items()]
    return section("plots", "Plots", *parts)


def headline_section(out: Path) -> str:
    """What the run learned, the lines `kdcache run` prints when it ends (`summary.py`)."""
    lines = "\n".join(summary_lines(out))
    return section("headline", "What this run found", f'<pre class="headline">{html.escape(lines)}</pre>')


# -- the page -------------------------------------------------------------------------


def render(out: Path) -> str:
    """The whole page for run directory `out`, as a string."""
    layout = RunLayout(root=out)
    runs, runs_problem = load(layout, layout.runs, read_runs)
    stores, stores_problem = load(layout, layout.stores, read_stores)
    title = f"kdcache run report: {out.resolve().name}"
    body = "".join([
        headline_section(out),
        # The figures and what they say first; the tables behind them after.
        plots_section(layout),
        findings_section(layout),
        fits_section(layout),
        teachers_section(layout, runs, stores or []),
        students_section(runs, runs_problem),
        stores_section(layout, stores, stores_problem),
        plans_section(layout),
        costs_section(layout),
        overview_section(layout),
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p><code>{html.escape(str(out.resolve()))}</code></p>{body}</body></html>\n")


def write_report(out_dir: Path) -> Path:
    """Write `out_dir/report.html` (atomically, so a reader never sees half a page); return its path."""
    path = RunLayout(root=Path(out_dir)).report
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(Path(out_dir)), encoding="utf-8")
    tmp.replace(path)
    return path
