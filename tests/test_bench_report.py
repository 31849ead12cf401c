"""scripts/bench_report.py on the committed results: BENCHMARKS.md stays short, has no empty columns,
is deterministic and is up to date; history.csv has one row per benchmark row of the raw JSON."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_report.py"
RESULTS = ROOT / "benchmarks" / "results"
HISTORY_COLUMNS = ["device", "date", "commit", "torch", "triton", "cuda", "suite", "group", "provider",
                   "shape", "dtype", "median_s", "q1_s", "q3_s", "min_s", "max_s", "rounds", "flops",
                   "source_file"]


def _render(out: Path) -> dict[str, bytes]:
    subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(out)], check=True, capture_output=True,
                   cwd=ROOT)
    return {name: (out / name).read_bytes() for name in ("BENCHMARKS.md", "history.csv")}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    first = _render(tmp_path_factory.mktemp("first"))
    second = _render(tmp_path_factory.mktemp("second"))
    assert first == second, "bench_report.py is not deterministic"
    return first


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header row first, separator row dropped)."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") and c for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _empty(cell: str) -> bool:
    if cell in ("", "–", "-"):
        return True
    try:
        return float(cell.split()[0]) == 0
    except (ValueError, IndexError):
        return False


def test_benchmarks_md_is_short_and_has_no_empty_column(rendered: dict[str, bytes]) -> None:
    text = rendered["BENCHMARKS.md"].decode()
    assert len(text.splitlines()) <= 300
    tables = _tables(text)
    assert tables
    for table in tables:
        header, body = table[0], table[1:]
        assert body and all(len(row) == len(header) for row in body), header
        for i, name in enumerate(header):
            assert not all(_empty(row[i]) for row in body), f"column {name!r} is empty in {header}"


def test_history_has_one_row_per_benchmark_row(rendered: dict[str, bytes]) -> None:
    want = sum(len(json.loads(p.read_text())["benchmarks"]) for p in RESULTS.glob("*.json"))
    reader = csv.DictReader(rendered["history.csv"].decode().splitlines())
    rows = list(reader)
    assert reader.fieldnames == HISTORY_COLUMNS
    assert len(rows) == want
    keys = [(r["source_file"], r["group"], r["provider"], r["shape"]) for r in rows]
    assert len(set(keys)) == len(keys), "a benchmark row is ambiguous (same file, group, provider, shape)"
    assert {r["source_file"] for r in rows} == {p.name for p in RESULTS.glob("*.json")}


def test_committed_outputs_are_up_to_date(rendered: dict[str, bytes]) -> None:
    hint = "stale: run `python scripts/bench_report.py` and commit BENCHMARKS.md and history.csv"
    assert (ROOT / "BENCHMARKS.md").read_bytes() == rendered["BENCHMARKS.md"], hint
    assert (RESULTS / "history.csv").read_bytes() == rendered["history.csv"], hint


def test_wide_tables_and_superseded_families(tmp_path: Path) -> None:
    """Rows with extra_info.table == "wide" render one row per shape, a column per provider (the
    first one the baseline of the ratios); a dtype tag in front of a group is not part of its family;
    an older run's family that a newer section of the device shows is listed, not tabled."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_report
    finally:
        sys.path.pop(0)

    def row(group, provider, median, dtype="bfloat16", wide=True):
        info = {"provider": provider, "device": "cpu", "dtype": dtype, "timing": "interleaved rounds"}
        if wide:
            info["table"] = "wide"
        return {"group": group, "stats": {"median": median, "rounds": 3}, "extra_info": info}

    def run(name, when, commit, rows, suite="interleaved"):
        data = {"datetime": when, "commit_info": {"id": commit}, "benchmarks": rows,
                "machine_info": {"cpu": {"brand_raw": "Test CPU"}}}
        return bench_report.Run(tmp_path / f"{name}.json", data, suite, rows)

    new = run("new", "2026-12-06T09:00:00", "b" * 40, [
        row("bf16 inference-m-B8 (interleaved)", "reference-autocast", 0.2),
        row("bf16 inference-m-B8 (interleaved)", "cpu-bf16", 0.1),
    ])
    old = run("old", "2026-12-06T08:00:00", "a" * 40, [
        row("inference-m-B8 (interleaved)", "reference", 0.3, dtype="float32", wide=False),
    ])
    suite = run("suite", "2026-12-06T07:00:00", "c" * 40, [
        row("inference-m-B8", "reference", 0.4, wide=False),
        row("train-step-m", "reference", 0.5, wide=False),
    ], suite="pytest-benchmark")
    text = bench_report.render([new, old, suite])
    assert "| shape | reference-autocast ms | cpu-bf16 ms (× reference-autocast) |" in text
    assert "| m-B8 | 200.0 | 100.0 (2.00) |" in text
    # float32's inference family is not the bf16 one: the older float32 run keeps its table ...
    assert "| m-B8 | reference | 300.0 |" in text.split("`old`")[1]
    # ... while the older bf16 suite run's inference is superseded, its train-step kept.
    tail = text.split("`suite`")[1]
    assert "in `history.csv` only: **inference**" in tail and "| m | reference | 500.0 |" in tail
    assert "400.0" not in tail
    # A run more than STALE_AFTER (6 h) older than the device's newest keeps only its header and links.
    stale = run("stale", "2026-12-05T09:00:00", "d" * 40, [
        row("layer-x (interleaved)", "reference", 0.7, dtype="float32", wide=False),
    ])
    text = bench_report.render([new, stale])
    assert "`stale`" in text and "700.0" not in text and "more than 6 h older" in text


def test_train_rows_are_their_own_suite(tmp_path: Path) -> None:
    """Rows of benchmarks/interleaved_train.py (extra_info.suite == "train") make a training-step
    section of their own, "train-step" family, ratio columns over the official emulation and the
    reference, and do not make an earlier layer/model run of the device "older" (as a deployment run)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_report
    finally:
        sys.path.pop(0)

    def row(group, provider, median, suite=None):
        info = {"provider": provider, "device": "cpu", "dtype": "float32", "timing": "interleaved rounds"}
        if suite:
            info["suite"] = suite
        return {"group": group, "stats": {"median": median, "q1": median, "q3": median, "rounds": 3},
                "extra_info": info}

    group = "train-step-pacavit_tiny_p2cconv_100_0-B8 (interleaved)"
    train_rows = [row(group, p, t, "train") for p, t in (("official", 4.0), ("reference", 3.0), ("cpu", 2.0))]
    assert {bench_report.suite_of(r) for r in train_rows} == {"train"}
    assert bench_report.split_group(train_rows[0]) == ("train-step", "pacavit_tiny_p2cconv_100_0-B8")
    data = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "benchmarks": train_rows}
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**data, "datetime": "2026-12-06T10:00:00", "commit_info": {"id": "b" * 40}}))
    layer = tmp_path / "layer.json"
    layer.write_text(json.dumps({"machine_info": data["machine_info"], "datetime": "2026-12-06T09:00:00",
                                 "commit_info": {"id": "a" * 40},
                                 "benchmarks": [row("inference-m (interleaved)", "reference", 0.3)]}))
    runs = bench_report.load_runs([layer, path])
    assert sorted(r.suite for r in runs) == ["interleaved", "train"]
    text = bench_report.render(runs)
    section = text.split("### training-step run")[1]
    assert "**train-step**" in section
    assert "| shape | provider | median ms | IQR ms | × official | × reference |" in section
    assert "| pacavit_tiny_p2cconv_100_0-B8 | cpu | 2000 | 2000–2000 | 2.00 | 1.50 |" in section
    assert "Older run" not in text  # the layer run at another commit stays current


def test_same_code_ignores_commits_outside_the_code(tmp_path: Path) -> None:
    """A run is "older" only when the code changed since: a commit that touches only results or notes
    (or README) keeps the runs before it current; one that touches the library does not; a dirty or
    unknown commit never counts as the same."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_report
    finally:
        sys.path.pop(0)

    def git(*args: str) -> str:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
        done = subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True,
                              env=env)
        return done.stdout.strip()

    def commit(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", "-A")
        git("commit", "-q", "-m", path)
        return git("rev-parse", "--short=7", "HEAD")

    git("init", "-q")
    base = commit("paca_kernels/op.py", "a = 1\n")
    docs = commit("benchmarks/results/run.json", "{}")
    docs = commit("benchmarks/NOTES.md", "notes")
    docs = commit("README.md", "readme")
    code = commit("csrc/cpu/op.cpp", "int a;")
    assert bench_report.same_code(base, base, tmp_path)
    assert bench_report.same_code(base, docs, tmp_path)
    assert not bench_report.same_code(base, code, tmp_path)
    assert not bench_report.same_code(docs, code, tmp_path)
    assert not bench_report.same_code(f"{base} (dirty)", docs, tmp_path)
    assert not bench_report.same_code(base, "unknown", tmp_path)
    assert not bench_report.same_code(base, "0000000", tmp_path)  # not a commit of the repository
