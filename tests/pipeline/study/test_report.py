"""The run report (`pipeline/study/report.py`) built from real parts and rendered by headless Chromium.

The full fixture is a run directory made the way `kdcache run` makes one: token data from
`prepare`, a teacher and two students trained through the CLI, logit stores written by
StoreWriter, a runs table, fit JSONs and plots from `kdcache fit`, recipes from `kdcache
plan`, costs from `kdcache cost` and the report's own figures from `plots.write_plots`.
Chromium renders the page; the tests read the rendered DOM's tables and notes and check
every image decoded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from kdcache.fit.plots import PAPER_LABEL
from kdcache.fit.presets import PAPER_DISTILLATION
from kdcache.fit.synthetic import distillation_runs, supervised_runs
from kdcache.fit.threads import single_threaded_blas
from kdcache.pipeline.cli import main
from kdcache.pipeline.study.findings import write_findings
from kdcache.pipeline.study.plots import agreement, write_plots
from kdcache.pipeline.study.plots import read_runs as read_plot_runs
from kdcache.pipeline.study.report import FIGURES, write_report
from kdcache.storage import StoreWriter, summarize
from kdcache.storage.runs import RunRow, append_run, read_runs
from tests.storage.conftest import make_meta, make_rows, shard_of

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# Records each image's decoded width (0 if it failed) on <body>; the report itself has no scripts.
PROBE = ('<script>addEventListener("load", () => { document.body.dataset.widths = '
         '[...document.images].map(i => i.naturalWidth).join(","); });</script>')
PAPER = "paper (Busbridge et al. 2025)"  # header of the published-values column
DISTILL_FIX = "c0=2.549,c1=522.6,f1=0.09,d1=1.315"  # the paper's capacity-gap terms: a fast fit
VALID_LOSS = 3.25  # L_T recorded in store topk-a
NOT_RECORDED = "not recorded (store predates it; rerun kdcache cache to add it)"


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        if os.environ.get("KDCACHE_REQUIRE_CHROMIUM") == "1":  # CI installs it: absence is a failure
            pytest.fail(f"{CHROMIUM} is missing and KDCACHE_REQUIRE_CHROMIUM=1")
        pytest.skip(f"{CHROMIUM} is not installed")
    return CHROMIUM


class Page(HTMLParser):
    """Tables (rows of cell texts), `class="missing"` and `class="note"` texts, per <section id>,
    and the images' alt texts in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.missing: dict[str, list[str]] = {}
        self.notes: dict[str, list[str]] = {}
        self.section, self.widths = "", ""
        self.cell: str | None = None  # text of the cell being read
        self.note: str | None = None  # text of the note being read
        self.kind = ""  # of the note being read: "missing" or "note"
        self.images = 0
        self.alts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id") or ""
        elif tag == "body":
            self.widths = a.get("data-widths") or ""
        elif tag == "table":
            self.tables.setdefault(self.section, []).append([])
        elif tag == "tr":
            self.tables[self.section][-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "img":
            self.images += 1
            self.alts.append(a.get("alt") or "")
        elif {"missing", "note"} & set((a.get("class") or "").split()):
            self.note, self.kind = "", "missing" if "missing" in (a.get("class") or "").split() else "note"

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell += data
        if self.note is not None:
            self.note += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[self.section][-1][-1].append(self.cell)
            self.cell = None
        elif tag in ("p", "span") and self.note is not None:
            found = self.missing if self.kind == "missing" else self.notes
            found.setdefault(self.section, []).append(self.note)
            self.note = None

    def rows(self, section: str, index: int = 0) -> dict[str, dict[str, str]]:
        """Table `index` of a section as {first cell: {header: cell}}."""
        head, *body = self.tables[section][index]
        return {r[0]: dict(zip(head, r, strict=True)) for r in body}


def render(chromium: Path, report: Path, tmp: Path) -> Page:
    probe = tmp / "probed.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    argv = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp / 'chromium-profile'}", "--dump-dom",
            probe.as_uri()]
    dom = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    page = Page()
    page.feed(dom)
    assert page.tables, f"Chromium rendered no tables: {dom[:500]!r}"
    return page


def self_contained(report: Path) -> None:
    text = report.read_text()
    for needle in ("<script", "<link", "http://", "https://", "url("):
        assert needle not in text, needle


def png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def cli_json(argv: list[str]) -> Any:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def synthetic_runs(runs: Path) -> None:
    """Runs from the paper's laws: isoFLOP supervised runs, distilled students, and a
    supervised twin at equal N and D for every student."""
    law = PAPER_DISTILLATION
    sup = supervised_runs(law.supervised, 16, seed=3)
    for i, (n, d, loss) in enumerate(zip(sup["params"], sup["tokens"], sup["loss"], strict=True)):
        append_run(runs, RunRow(run_id=f"iso-{i:02d}", kind="supervised", params=int(n), tokens=int(d),
                                loss=float(loss)))
    dist = distillation_runs(law, 24, seed=4)
    for i in range(24):
        n, d = int(dist["params"][i]), int(dist["tokens"][i])
        append_run(runs, RunRow(run_id=f"distill-{i:02d}", kind="distill", params=n, tokens=d,
                                loss=float(dist["loss"][i]), teacher_loss=float(dist["teacher_loss"][i]),
                                teacher_params=int(dist["teacher_params"][i]), store="stores/topk-a", k=4,
                                ece=0.01 + i / 1000))
        append_run(runs, RunRow(run_id=f"twin-{i:02d}", kind="supervised", params=n, tokens=d,
                                loss=float(law.supervised.loss(n, d)) * (1 + (i % 5 - 2) / 500), ece=0.02))


def write_stores(stores: Path) -> None:
    """Top-k stores of teacher `a`: a complete one with its L_T, one completed before stores
    recorded L_T (no `valid_loss`), and one interrupted after its first shard."""
    for name, shards, valid in (("topk-a", None, (VALID_LOSS, 320)), ("topk-a-old", None, None),
                                ("topk-a-partial", [0], None)):
        meta = make_meta("topk", rows=10, seq_len=32, vocab=384, k=4, shard_rows=4, teacher="a")
        rows = make_rows(meta, seed=1)
        writer = StoreWriter.open(stores / name, meta)
        for shard in shards if shards is not None else writer.pending_shards():
            writer.write_shard(shard, shard_of(meta, rows, shard))
        if shards is None:
            assert writer.finalize(valid=valid)


@pytest.fixture(scope="module")
def run_dir(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(token_data, out / "data")
    (out / "fits").mkdir()
    (out / "plots").mkdir()
    runs = out / "runs.parquet"
    synthetic_runs(runs)
    shutil.copy(runs, out / "fits/runs.parquet")  # the fitted subset, as `kdcache run` writes it
    # Fit before the tiny real models join the table: the synthetic runs span the paper's
    # scale (1e8-1e10 params) and a 50k-param model would only be an outlier to them.
    sup_fit, dist_fit = out / "fits/supervised.json", out / "fits/distillation.json"
    with single_threaded_blas():
        sup = cli_json(["fit", "--runs", str(runs), "--law", "supervised", "--fix", "E=1.22,gamma=0.452",
                        "--bootstrap", "4", "--json", "--plot", str(out / "plots/fit-supervised.png")])
        sup_fit.write_text(json.dumps(sup))
        dist = cli_json(["fit", "--runs", str(runs), "--law", "distillation", "--supervised", str(sup_fit),
                         "--fix", DISTILL_FIX, "--bootstrap", "4", "--json"])
        dist_fit.write_text(json.dumps(dist))
    (out / "fits/notes.json").write_text(json.dumps(
        {"distillation": "too few runs to fit c0, c1, f1, d1; the paper's values are used"}))
    common = ["--data", str(out / "data"), "--layers", "1", "--tokens", "2048", "--batch-size", "8",
              "--eval-rows", "16", "--runs", str(runs), "--checkpoint-every", "0", "--quiet"]
    teacher = out / "teachers/a"
    assert main(["train", "--split", "teacher", "--out", str(teacher), "--run-id", "teacher-a", *common]) == 0
    assert main(["train", "--out", str(out / "students/supervised-a"), "--run-id", "supervised-a",
                 *common]) == 0
    assert main(["train", "--out", str(out / "students/online-a"), "--run-id", "online-a",
                 "--online-teacher", str(teacher), *common]) == 0
    write_stores(out / "stores")
    plans = [cli_json(["plan", "--law", "paper", "--student-params", "1e8", "--compute", "1e20",
                       "--scenario", s, "--no-crossover", "--json"]) for s in ("best", "inference")]
    (out / "plans.json").write_text(json.dumps(plans))
    cost = cli_json(["cost", "--teacher-params", "50368", "--student-params", "50368", "--tokens", "2048",
                     "--students", "4", "--store", str(out / "stores/topk-a"), "--json",
                     "--plot", str(out / "plots/cost.png")])
    (out / "costs.json").write_text(json.dumps([{"label": "store topk-a", **cost}]))
    assert write_plots(out) == [out / "plots" / f"{stem}.png" for stem in FIGURES]
    write_findings(out, {"topk": str((out / "stores/topk-a").resolve())}, [], layers=1)
    return out


@pytest.fixture(scope="module")
def full_page(run_dir: Path, chromium: Path, tmp_path_factory: pytest.TempPathFactory) -> Page:
    report = write_report(run_dir)
    assert report == run_dir / "report.html"
    self_contained(report)
    return render(chromium, report, tmp_path_factory.mktemp("chromium"))


def by_id(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in read_runs(run_dir / "runs.parquet").to_pylist()}


@pytest.mark.slow
def test_full_run_has_every_section_and_no_missing_notes(full_page: Page, run_dir: Path) -> None:
    assert full_page.missing == {}
    assert list(full_page.tables) == ["findings", "fits", "teachers", "students", "stores", "plans", "costs"]
    findings = json.loads((run_dir / "findings.json").read_text())
    got = full_page.rows("findings")
    assert list(got) == [f["claim"] for f in findings]
    assert [r["here"] for r in got.values()] == ["not testable"] * 4  # no law grid here
    assert len(full_page.tables["fits"]) == 2


@pytest.mark.slow
def test_teachers_and_students_tables(full_page: Page, run_dir: Path) -> None:
    runs = by_id(run_dir)
    teacher = full_page.rows("teachers")["a"]
    row = runs["teacher-a"]
    assert teacher["run"] == "teacher-a" and teacher["params N"] == f"{row['params']:,}"
    assert teacher["validation loss"] == f"{row['loss']:.4f}" and teacher["ECE"] == f"{row['ece']:.4f}"
    assert teacher["stores"] == "topk-a, topk-a-old, topk-a-partial" and teacher["model dir"] == "yes"

    students = full_page.rows("students")
    online, twin = runs["online-a"], runs["supervised-a"]
    got = students["online-a"]
    assert got["kind"] == "online" and got["student loss"] == f"{online['loss']:.4f}"
    assert got["supervised loss"] == f"{twin['loss']:.4f}"
    assert got["distilled − supervised"] == f"{online['loss'] - twin['loss']:.4f}"
    assert got["teacher loss"] == f"{online['teacher_loss']:.4f}" and got["k"] == "384"
    distilled, sup = runs["distill-03"], runs["twin-03"]
    got = students["distill-03"]
    assert got["store"] == "topk-a" and got["k"] == "4" and got["ECE"] == f"{distilled['ece']:.4f}"
    assert got["supervised loss"] == f"{sup['loss']:.4f}" and got["supervised ECE"] == "0.0200"
    assert len(students) == 25  # 24 distilled + 1 online; supervised runs only as twins


@pytest.mark.slow
def test_stores_table(full_page: Page, run_dir: Path) -> None:
    stores = full_page.rows("stores")
    done, partial = summarize(run_dir / "stores/topk-a"), summarize(run_dir / "stores/topk-a-partial")
    got = stores["topk-a"]
    assert got["kind"] == "topk" and got["k"] == "4" and got["teacher"] == "a"
    assert got["rows"] == "10" and got["tokens"] == "320" and got["bytes on disk"] == f"{done['bytes']:,}"
    assert got["bytes/token"] == f"{done['bytes_per_token']:.1f}" and got["complete"] == "yes"
    assert got["L_T (valid CE)"] == f"{VALID_LOSS:.4f}"
    assert got["cached-split NLL"] == f"{done['teacher_loss']:.4f}"
    got = stores["topk-a-old"]
    assert got["L_T (valid CE)"] == "—" and got["cached-split NLL"] != "—" and got["complete"] == "yes"
    got = stores["topk-a-partial"]
    assert got["rows"] == "4" and got["complete"] == "no" and got["cached-split NLL"] == "—"
    assert got["L_T (valid CE)"] == "—" and got["bytes/token"] == f"{partial['bytes_per_token']:.1f}"
    # Only the complete store without L_T is said to predate it; the partial one is merely unfinished.
    old = [n for n in full_page.notes["stores"] if NOT_RECORDED in n]
    assert old == [f"L_T (valid CE) of topk-a-old: {NOT_RECORDED}."]


@pytest.mark.slow
def test_fit_tables_next_to_paper_values(full_page: Page, run_dir: Path) -> None:
    sup = json.loads((run_dir / "fits/supervised.json").read_text())
    rows = full_page.rows("fits", 0)
    assert list(rows) == ["E", "A", "B", "alpha", "beta", "gamma"]
    assert rows["B"]["fitted"] == f"{sup['params']['B']:.5g}" and rows["B"][PAPER] == "18186"
    lo, hi = sup["bootstrap"]["intervals"]["alpha"]
    assert rows["alpha"]["90% interval"] == f"[{lo:.4g}, {hi:.4g}]"
    assert rows["E"]["fitted"] == rows["E"][PAPER] == "1.22" and rows["E"]["90% interval"] == "fixed"
    dist = full_page.rows("fits", 1)
    assert dist["c1"]["90% interval"] == "fixed" and dist["c1"][PAPER] == "522.6"
    assert dist["alpha"]["fitted"] != "—" and dist["alpha"]["90% interval"].startswith("[")


@pytest.mark.slow
def test_plans_costs_and_plots(full_page: Page, run_dir: Path) -> None:
    plans = json.loads((run_dir / "plans.json").read_text())
    got = full_page.rows("plans")
    assert list(got) == ["best", "inference"]
    assert got["inference"]["student loss"] == f"{plans[1]['student_loss']:.4f}"
    assert got["best"]["compute (FLOPs)"] == "1e+20"
    cost = json.loads((run_dir / "costs.json").read_text())[0]
    row = full_page.rows("costs")["store topk-a"]
    assert row["break-even M"] == str(cost["break_even_students"]) and row["students M"] == "4"
    assert row["bytes/token"] == f"{summarize(run_dir / 'stores/topk-a')['bytes_per_token']:.1f}"
    # The run's own figures first, in order, named by their titles; then fit-*/cost-* by name.
    titles = [title for title, _ in FIGURES.values()]
    assert full_page.alts == [*titles, "cost", "fit-supervised"]
    pngs = [run_dir / "plots" / f"{stem}.png" for stem in [*FIGURES, "cost", "fit-supervised"]]
    assert full_page.images == len(list((run_dir / "plots").glob("*.png"))) == 6
    assert full_page.widths == ",".join(str(png_width(p)) for p in pngs)  # every image decoded
    assert all(png_width(p) > 0 for p in pngs)
    assert not (run_dir / "plots" / "skipped.json").exists()
    assert any("paper's law (not fitted here)" in n for n in full_page.notes["plots"])


@pytest.mark.slow
def test_partial_run_says_what_is_missing(chromium: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    runs = out / "runs.parquet"
    append_run(runs, RunRow(run_id="teacher-x", kind="supervised", params=1000, tokens=20000, loss=3.5))
    append_run(runs, RunRow(run_id="<b>s</b>&", kind="distill", params=100, tokens=2000, loss=4.25,
                            teacher_loss=3.5))
    (out / "plans.json").write_text('[{"scenario": "be')  # a torn write
    report = write_report(out)
    self_contained(report)
    page = render(chromium, report, tmp_path)
    assert "<b>s</b>&" in page.rows("students")  # escaped: shown as text, not markup
    assert page.rows("students")["<b>s</b>&"]["supervised loss"] == "—"
    assert page.rows("teachers")["x"]["model dir"] == "missing"
    assert len(page.missing["overview"]) == 8  # every part but runs.parquet and plans.json
    for section, rel in (("teachers", "teachers"), ("stores", "stores"), ("costs", "costs.json"),
                         ("plots", "plots")):
        assert any(text.startswith(f"Missing: {rel}") for text in page.missing[section]), section
    assert page.missing["plans"][0].startswith("Unreadable: plans.json")
    assert sum("fits/" in text for text in page.missing["fits"]) == 2
    assert "students" not in page.missing and page.images == 0


def test_write_plots_without_inputs_draws_nothing_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "allocations.png").write_bytes(b"from an earlier run")
    assert write_plots(tmp_path) == []
    skipped = json.loads((tmp_path / "plots" / "skipped.json").read_text())
    assert list(skipped) == [f"{stem}.png" for stem in FIGURES]
    assert all("no runs table" in why for name, why in skipped.items() if name != "allocations.png")
    assert "no plans.json" in skipped["allocations.png"]  # recipes are drawn at the plans' scale
    assert not list((tmp_path / "plots").glob("*.png"))  # the stale figure is gone
    page = Page()
    page.feed(write_report(tmp_path).read_text())
    assert [n for n in page.notes["plots"] if n.startswith("Not drawn")] == [
        f"Not drawn: {stem}.png ({skipped[stem + '.png']})." for stem in FIGURES]
    assert "plots" not in page.missing and page.images == 0


def test_write_plots_from_runs_alone_uses_the_papers_law(tmp_path: Path) -> None:
    synthetic_runs(tmp_path / "runs.parquet")
    plots = tmp_path / "plots"
    assert write_plots(tmp_path) == [plots / f"{stem}.png" for stem in list(FIGURES)[:3]]
    skipped = json.loads((plots / "skipped.json").read_text())
    assert skipped == {"allocations.png": "no plans.json to take the budgets from"}
    # No fit: the predicted-vs-observed panels are the paper's law on the runs it generated.
    sup = agreement(tmp_path, "supervised", "t", read_plot_runs(tmp_path), None)
    assert PAPER_LABEL in sup.title and len(sup.observed) == 40 and not sup.held_out.any()
    fitted_mean = sup.errors()["fitted"]
    assert fitted_mean is not None and fitted_mean[0] < 0.006  # the runs' 0.3% noise and twins' 0.4%
    (tmp_path / "plans.json").write_text(json.dumps([{"compute": 1e20, "student_params": 1e8},
                                                     {"compute": 1e21, "student_params": 1e9}]))
    assert len(write_plots(tmp_path)) == 4 and not (plots / "skipped.json").exists()


def test_write_plots_with_a_broken_fit_names_it(tmp_path: Path) -> None:
    synthetic_runs(tmp_path / "runs.parquet")
    (tmp_path / "fits").mkdir()
    (tmp_path / "fits" / "supervised.json").write_text("{")
    (tmp_path / "plans.json").write_text(json.dumps([{"compute": 1e20, "student_params": 1e8}]))
    assert write_plots(tmp_path) == []
    skipped = json.loads((tmp_path / "plots" / "skipped.json").read_text())
    assert all("supervised.json" in why for why in skipped.values()), skipped


@pytest.mark.slow
def test_figures_errors_are_the_fits_extrapolation_check(run_dir: Path) -> None:
    runs = read_plot_runs(run_dir)
    for law in ("supervised", "distillation"):
        fit = json.loads((run_dir / f"fits/{law}.json").read_text())
        panel = agreement(run_dir, law, "t", runs, object())
        ex = fit["extrapolation"]
        assert int(panel.held_out.sum()) == ex["held_out_runs"] > 0
        assert panel.errors()["held_out"] == pytest.approx(
            (ex["mean_relative_error"], ex["max_relative_error"]), rel=1e-12)
        assert panel.threshold == ex["threshold"]
