"""Turn the raw benchmark JSON under benchmarks/results/ into BENCHMARKS.md and
benchmarks/results/history.csv, in one command:

    python scripts/bench_report.py                     # every JSON in benchmarks/results
    python scripts/bench_report.py results/a.json ...  # only these files (both outputs cover only them)
    python scripts/bench_report.py --out-dir DIR       # write DIR/BENCHMARKS.md and DIR/history.csv instead
    python scripts/bench_report.py --check             # exit 1 if the committed files are stale
    python scripts/bench_report.py --plots             # also draw a missing <run>-scaling.png (matplotlib)

Both outputs are generated (never edit them by hand) and deterministic: the same JSON files (and the
same benchmarks/NOTES.md, whose run headings BENCHMARKS.md links to) give the same bytes. Nothing
depends on the clock or on the git HEAD; git is asked only for the commit that added a JSON file
without commit_info. tests/test_bench_report.py checks that the committed outputs are up to date.

Inputs: pytest-benchmark-layout JSON (`benchmarks` rows with `group`, `stats`, `extra_info`), written
by `make bench` (the pytest-benchmark suite, benchmarks/test_bench_*.py) or by
benchmarks/interleaved.py. The run narratives live in benchmarks/NOTES.md, not here.

Suite of a row (and so of a file's rows): "interleaved" when its extra_info.timing is
"interleaved rounds" (what benchmarks/interleaved.py writes) or, for files without that field, its
group ends in " (interleaved)"; every other row is "pytest-benchmark". Device of a row: extra_info's
device_name (a GPU's name) else its device, for CPU rows with the run's CPU model ("cpu: AMD EPYC";
runs that recorded only the architecture are "cpu: machine not recorded", kept out of BENCHMARKS.md's
sections and listed in one line). BENCHMARKS.md shows, for each device, suite and
dtype, the latest run only (latest by the JSON's `datetime`); history.csv holds every row of every file.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTES = ROOT / "benchmarks" / "NOTES.md"
# Ratio columns: each of these present in a table is a "× <baseline>" column (eager and compiled
# baselines side by side: the official layer for the layer rows, the reference backend for the op and
# model rows, full self-attention for the scaling sweep).
BASELINES = ["official", "official-compiled", "reference", "reference-compiled", "full-sdpa", "onnxrt-official",
             "onnxrt-reference"]
SUITE_TITLE = {
    "pytest-benchmark": "pytest-benchmark suite (op, layer, model, scaling)",
    "interleaved": "interleaved layer + model run",
    "deploy": "deployment run (ONNX Runtime, AOTInductor, eager, compiled)",
    "train": "training-step run (forward, loss, backward, SGD step; eager, compiled)",
}
SUITE_RERUN = {
    "pytest-benchmark": "`make bench`",
    "interleaved": ("`python benchmarks/interleaved.py --models tiny,small --out "
                    "benchmarks/results/<name>.json`, then `python scripts/bench_report.py`"),
    "deploy": ("`python benchmarks/deploy_interleaved.py --out benchmarks/results/<name>.json`, then "
               "`python scripts/bench_report.py`"),
    "train": ("`python benchmarks/interleaved_train.py --out benchmarks/results/<name>.json`, then "
              "`python scripts/bench_report.py`"),
}
#: Suites of interleaved runs that time other paths than the layer and model rows (the deployment
#: paths, the training steps): their rows carry ``extra_info.suite``, and a run of theirs does not
#: make the layer and model runs before it "older".
OWN_SUITES = ("deploy", "train")
HISTORY_COLUMNS = ["device", "date", "commit", "torch", "triton", "cuda", "suite", "group", "provider",
                   "shape", "dtype", "median_s", "q1_s", "q3_s", "min_s", "max_s", "rounds", "flops",
                   "source_file"]
MISSING = "–"


# --------------------------------------------------------------------------------------------------
# Reading the raw files


@dataclass
class Run:
    """One results file's rows of one suite (a file usually holds one suite)."""

    path: Path
    data: dict
    suite: str
    rows: list[dict] = field(default_factory=list)

    @property
    def datetime(self) -> str:
        return self.data.get("datetime", "")

    @property
    def date(self) -> str:
        return _short_date(self.datetime)


def suite_of(row: dict) -> str:
    info = row.get("extra_info", {})
    if info.get("timing") == "interleaved rounds":
        return info["suite"] if info.get("suite") in OWN_SUITES else "interleaved"
    if "timing" not in info and row.get("group", "").endswith(" (interleaved)"):
        return "interleaved"
    return "pytest-benchmark"


#: What ``machine_info.cpu.brand_raw`` holds when only the architecture was found (no model name).
_ARCH_ONLY = {"", "x86_64", "amd64", "i386", "i686", "aarch64", "arm64"}
UNRECORDED = "machine not recorded"


def device_of(row: dict, data: dict | None = None) -> str:
    """A row's device: a GPU's name, or for CPU rows "cpu: <the run's CPU model>" (results from
    different CPU models are not comparable, so each model gets its own section)."""
    info = row.get("extra_info", {})
    device = str(info.get("device_name") or info.get("device") or "unknown")
    if device != "cpu" or data is None:
        return device
    brand = str((data.get("machine_info") or {}).get("cpu", {}).get("brand_raw") or "").strip()
    return f"cpu: {brand if brand.lower() not in _ARCH_ONLY else UNRECORDED}"


def split_group(row: dict) -> tuple[str, str]:
    """(family, shape) of a row: 'p2c_attention-fwd+bwd-tiny-s1-B8-...' -> ('p2c_attention-fwd+bwd',
    'tiny-s1-B8-...'); 'inference-pacavit_tiny_p2cconv_100_0' -> ('inference', 'pacavit_tiny_...');
    a group without a shape part (the scaling sweep) takes the row's own size (N, image side)."""
    group = row.get("group") or ""
    # A dtype tag in front ("bf16 PaCaAttention-fwd-..."): the section already names the dtype.
    base = re.sub(r"^(?:bf16|fp16) ", "", group.removesuffix(" (interleaved)"))
    info = row.get("extra_info", {})
    m = re.match(r"^(.+?-(?:fwd\+bwd|fwd|bwd))-(.+)$", base)
    if m:
        return m.group(1), m.group(2)
    m = re.match(r"^(inference|train-step|deployment)-(.+)$", base)
    if m:
        return m.group(1), m.group(2)
    if "N" in info:
        side = info.get("image_size")
        return base, f"N{info['N']}" + (f"-S{side}" if side is not None else "")
    return base, ""


def _short_date(iso: str) -> str:
    """'2026-11-22T06:51:43.07+00:00' -> '2026-11-22 06:51 UTC' (the JSON's datetimes are UTC)."""
    m = re.match(r"^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})", iso)
    return f"{m.group(1)} {m.group(2)} UTC" if m else (iso or "unknown date")


_git_cache: dict[Path, str] = {}


#: What a run measures: the library, its kernels, its build and the benchmark harness (not the
#: results and their notes). Two commits that differ only outside these measure the same code.
CODE_PATHS = ("csrc", "paca_kernels", "benchmarks", "setup.py", "CMakeLists.txt", "pyproject.toml",
              ":(exclude)benchmarks/results", ":(exclude)benchmarks/NOTES.md")
_same_code_cache: dict[tuple[str, str, Path], bool] = {}


def same_code(commit_a: str, commit_b: str, repo: Path = ROOT) -> bool:
    """Whether two runs' commits (as :func:`commit_of` gives them) measure the same code: equal, or
    clean commits whose difference (git) touches nothing under CODE_PATHS. A dirty or unknown commit,
    or no git, counts as different."""
    if commit_a == commit_b:
        return True
    if not all(c and " " not in c for c in (commit_a, commit_b)):  # "(dirty)", "(added the file)", ...
        return False
    key = (commit_a, commit_b, repo)
    if key not in _same_code_cache:
        try:
            done = subprocess.run(["git", "diff", "--quiet", commit_a, commit_b, "--", *CODE_PATHS],
                                  cwd=repo, capture_output=True, check=False)
            _same_code_cache[key] = done.returncode == 0
        except OSError:
            _same_code_cache[key] = False
    return _same_code_cache[key]


def commit_of(path: Path, data: dict) -> str:
    """Short commit of a run: the JSON's commit_info, else the commit that added the file (git)."""
    info = data.get("commit_info") or {}
    if info.get("id"):
        return info["id"][:7] + (" (dirty)" if info.get("dirty") else "")
    if path not in _git_cache:
        try:
            cmd = ["git", "log", "--diff-filter=A", "--format=%h", "--abbrev=7", "--", path.name]
            done = subprocess.run(cmd, cwd=path.parent, capture_output=True, text=True, check=True)
            out = done.stdout.split()
            _git_cache[path] = f"{out[-1]} (added the file)" if out else "uncommitted"
        except (OSError, subprocess.CalledProcessError):
            _git_cache[path] = "unknown"
    return _git_cache[path]


def load_runs(files: list[Path]) -> list[Run]:
    runs = []
    for path in files:
        data = json.loads(path.read_text())
        by_suite: dict[str, list[dict]] = defaultdict(list)
        for row in data.get("benchmarks", []):
            by_suite[suite_of(row)].append(row)
        runs += [Run(path, data, suite, rows) for suite, rows in by_suite.items()]
    return runs


# --------------------------------------------------------------------------------------------------
# history.csv


def _num(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def history_rows(runs: list[Run]) -> list[dict[str, str]]:
    out = []
    for run in runs:
        for row in run.rows:
            info, stats = row.get("extra_info", {}), row.get("stats") or {}
            out.append({
                "device": device_of(row, run.data), "date": run.datetime, "commit": commit_of(run.path, run.data),
                "torch": info.get("torch") or "", "triton": info.get("triton") or "",
                "cuda": info.get("cuda") or "", "suite": run.suite, "group": row.get("group", ""),
                "provider": info.get("provider", ""), "shape": split_group(row)[1],
                "dtype": info.get("dtype") or "", "median_s": _num(stats.get("median")),
                "q1_s": _num(stats.get("q1")), "q3_s": _num(stats.get("q3")), "min_s": _num(stats.get("min")),
                "max_s": _num(stats.get("max")), "rounds": _num(stats.get("rounds")),
                "flops": _num(info.get("flops")), "source_file": run.path.name,
            })
    out.sort(key=lambda r: (r["device"], r["date"], r["source_file"], r["suite"], r["group"], r["shape"],
                            r["provider"], r["median_s"]))
    return out


def render_history(runs: list[Run]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history_rows(runs))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# BENCHMARKS.md


def natural_key(text: str) -> list:
    """'N3136' before 'N16384': digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def is_empty_cell(cell: str) -> bool:
    """A cell that carries nothing: blank, the missing mark, or a zero ("0.0" GB/s where the bytes
    are too few to show)."""
    cell = cell.strip()
    if cell in ("", MISSING, "-"):
        return True
    try:
        return float(cell) == 0
    except ValueError:
        return False


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    ms = seconds * 1e3
    for limit, digits in ((1000, 0), (100, 1), (10, 2)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.3f}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _notes_link(run: Run, notes_text: str) -> str | None:
    for line in notes_text.splitlines():
        if line.startswith("## ") and run.path.stem in line.split():
            return f"[NOTES.md](benchmarks/NOTES.md#{_slug(line[3:])})"
    legacy = run.path.with_name(f"{run.path.stem}.notes.md")
    if legacy.exists():
        return f"[`{legacy.name}`](benchmarks/results/{legacy.name})"
    return None


def _range(low: float | None, high: float | None) -> str:
    return MISSING if low is None or high is None else f"{_ms(low)}–{_ms(high)}"


def _fixed(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return MISSING if not value else f"{value * scale:.{digits}f}"


def _wide_table(rows: list[dict]) -> list[str]:
    """A family whose rows ask for it (``extra_info.table == "wide"``: many providers per shape) as
    one row per shape and a column per provider: the median ms and, after the first provider (the
    baseline), the speed-up over it; the spreads are in the NOTES and the raw data."""
    providers = list(dict.fromkeys(r["extra_info"].get("provider", MISSING) for r in rows))
    by_shape: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_shape[split_group(r)[1] or MISSING][r["extra_info"].get("provider", MISSING)] = r
    base = providers[0]
    lines = ["| shape | " + " | ".join(f"{p} ms" + ("" if p == base else f" (× {base})") for p in providers)
             + " |", "|" + "---|" * (len(providers) + 1)]
    for shape in sorted(by_shape, key=natural_key):
        cells = []
        b = by_shape[shape].get(base)
        for p in providers:
            r = by_shape[shape].get(p)
            if r is None:
                cells.append(MISSING)
                continue
            med = r["stats"]["median"]
            ratio = f" ({b['stats']['median'] / med:.2f})" if b is not None and p != base else ""
            cells.append(_ms(med) + ratio)
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return lines


def _table(rows: list[dict]) -> list[str]:
    """One table for one family of groups (e.g. every p2c_attention-fwd shape): a row per shape and
    provider, fastest first within a shape; columns that would be empty everywhere are left out."""
    infos = [r["extra_info"] for r in rows]
    bases = [b for b in BASELINES if any(i.get("provider") == b for i in infos)]
    tera = max((i.get("tflops") or 0) for i in infos) >= 1
    varying_rounds = len({r["stats"].get("rounds") for r in rows}) > 1
    medians = {(split_group(r)[1], r["extra_info"].get("provider")): r["stats"]["median"] for r in rows}
    ordered = sorted(rows, key=lambda r: (natural_key(split_group(r)[1]), r["stats"]["median"],
                                          r["extra_info"].get("provider", "")))

    def cells(r: dict) -> dict[str, str]:
        st, e = r["stats"], r["extra_info"]
        counted = (e.get("min_bytes") or 0) > 0  # bytes counted: GB/s means something
        out = {
            "shape": split_group(r)[1] or MISSING,
            "provider": e.get("provider", MISSING),
            "median ms": _ms(st.get("median")),
            "IQR ms": _range(st.get("q1"), st.get("q3")),
            "min–max ms": _range(st.get("min"), st.get("max")),
        }
        if varying_rounds:
            out["rounds"] = str(st.get("rounds", MISSING))
        out["TFLOP/s" if tera else "GFLOP/s"] = _fixed(e.get("tflops"), 1 if tera else 1e3)
        out["% matmul"] = _fixed(e.get("share_of_matmul_rate"), 100)
        out["GB/s"] = _fixed(e.get("gbps")) if counted else MISSING
        out["% copy BW"] = _fixed(e.get("share_of_copy_bandwidth"), 100) if counted else MISSING
        out["peak MiB"] = _fixed(e.get("peak_memory_bytes"), 2**-20, 0)
        for b in bases:
            base = medians.get((split_group(r)[1], b))
            out[f"× {b}"] = f"{base / st['median']:.2f}" if base else MISSING
        return out

    table = [cells(r) for r in ordered]
    header = [h for h in table[0] if not all(is_empty_cell(row[h]) for row in table)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for row in table:
        shape = row["shape"]
        if shape == previous:
            row = {**row, "shape": ""}  # the shape is named on its first row only
        previous = shape
        lines.append("| " + " | ".join(row[h] for h in header) + " |")
    return lines


#: An older run's tables stay in BENCHMARKS.md only while it is at most this much older than its
#: device's newest run.
STALE_AFTER = datetime.timedelta(hours=6)


def _parsed(stamp: str) -> datetime.datetime:
    """A JSON ``datetime`` (ISO 8601) as an aware datetime; unparseable or missing: the epoch."""
    try:
        value = datetime.datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def _section(run: Run, newest: Run, notes_text: str, shown: set[tuple[str, str]] | None = None) -> list[str]:
    """A run's section; ``shown``: the (family, dtype) pairs newer sections of the device show, which
    an older run's section leaves to history.csv (noted in one line) to keep the file short."""
    rows = [r for r in run.rows if r.get("stats")]
    info0 = rows[0]["extra_info"] if rows else {}
    machine = run.data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    threads = f"{cpu['count']} CPU threads" if cpu.get("count") else ""
    system = " ".join(x for x in (machine.get("system"), machine.get("release")) if x)
    host = ", ".join(x for x in (cpu.get("brand_raw"), threads, system) if x)
    dtype = info0.get("dtype") or "?"
    lines = [f"### {SUITE_TITLE.get(run.suite, run.suite)}, {dtype}: `{run.path.stem}`", ""]
    commit, newest_commit = commit_of(run.path, run.data), commit_of(newest.path, newest.data)
    older = run.path != newest.path and not same_code(commit, newest_commit)
    if older:
        rerun = SUITE_RERUN.get(run.suite, "`make bench`")
        lines += [(f"> **Older run**: figures from {run.date}, before the code changes measured since "
                   f"(newest run on this device: `{newest.path.stem}`, {newest.date}, commit "
                   f"{newest_commit}). Rerun with {rerun}."), ""]
    versions = f"torch {info0.get('torch') or '?'}"
    if info0.get("triton"):
        versions += f", Triton {info0['triton']}"
    if info0.get("cuda"):
        versions += f", CUDA {info0['cuda']}"
    ceilings = []
    if any((r["extra_info"].get("min_bytes") or 0) > 0 for r in rows) and info0.get("ceiling_copy_gbps"):
        ceilings.append(f"copy {info0['ceiling_copy_gbps']:.1f} GB/s")
    if info0.get("ceiling_matmul_tflops"):
        t = info0["ceiling_matmul_tflops"]
        ceilings.append(f"matmul {t:.1f} TFLOP/s" if t >= 1 else f"matmul {t * 1e3:.1f} GFLOP/s")
    rounds = sorted({r["stats"].get("rounds") for r in rows if r["stats"].get("rounds") is not None})
    rounds_text = "?" if not rounds else str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}–{rounds[-1]}"
    timing = info0.get("timing") or "pytest-benchmark, each provider's rounds back to back"
    lines += [
        f"- date {run.date}, commit {commit}; {versions}; machine: {host or 'not recorded'}",
        (f"- timing: {timing}, {rounds_text} rounds per row"
         + (f"; ceilings measured in the run: {', '.join(ceilings)}" if ceilings else "")),
    ]
    link = _notes_link(run, notes_text)
    raw = f"[`{run.path.name}`](benchmarks/results/{run.path.name})"
    lines += [f"- raw data {raw}" + (f"; how it was made and how to read it: {link}" if link else ""), ""]

    if older and _parsed(newest.datetime) - _parsed(run.datetime) > STALE_AFTER:
        # Figures from long before the device's newest run: named and linked, rows in history.csv only
        # (keeps this file short).
        hours = round(STALE_AFTER.total_seconds() / 3600)
        lines[-1:] = [f"- its tables are in `history.csv` only (more than {hours} h older than the device's newest run)",
                      ""]
        return lines
    families: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        families[split_group(r)[0]].append(r)
    skipped = sorted(f for f in families if older and shown is not None and (f, dtype) in shown)
    if skipped:
        lines += [(f"Superseded by the newer section(s) above, in `history.csv` only: "
                   f"{', '.join(f'**{f}**' for f in skipped)}."), ""]
    for family in sorted(families):
        if family in skipped:
            continue
        png = run.path.with_name(f"{run.path.stem}-scaling.png")
        plotted = family.startswith("scaling") and png.exists()
        extra = f" ([plot](benchmarks/results/{png.name}))" if plotted else ""
        wide = all(r["extra_info"].get("table") == "wide" for r in families[family])
        table = _wide_table(families[family]) if wide else _table(families[family])
        lines += [f"**{family}**{extra}", "", *table, ""]
    if shown is not None:
        shown.update((f, dtype) for f in families)
    return lines


HOW_TO_READ = """\
## How to read it

- **Sections.** For each device (each CPU model is one: their figures do not compare) and dtype, the
  latest run of each suite. A results file's suite comes from its rows: `extra_info.timing ==
  "interleaved rounds"` (written by `benchmarks/interleaved.py`) is the *interleaved* run, everything
  else the *pytest-benchmark* suite (`make bench`, `benchmarks/test_bench_*.py`), and those with
  `extra_info.suite == "deploy"` the *deployment* run (`benchmarks/deploy_interleaved.py`), those with
  `extra_info.suite == "train"` the *training-step* run (`benchmarks/interleaved_train.py`). A section
  is marked **older run** when a later run on the same device was made at another commit (a deployment
  or training-step run does not count for the others); its tables that a newer section of the device
  also shows (same family and dtype) are left to `history.csv`, the others stay, unless the run is
  more than 6 hours older than the device's newest (then all its tables are left to `history.csv`).
- **median ms**: the median wall time of one call over the timed rounds (`time.perf_counter`, device
  synchronised before and after each call; warm-up calls first, so compilation is not timed).
  **IQR** (first to third quartile) and **min–max** are the spread over the same rounds: where two
  providers' ranges overlap, their difference is within this machine's noise.
- **× baseline**: the baseline provider's median over this row's median, same group and shape
  (> 1: faster than the baseline). Baselines: `official` / `official-compiled` (the official PaCa
  layer, eager / `torch.compile`) for the layer, `reference` / `reference-compiled` (this package's
  pure-PyTorch backend) for the ops and models, `full-sdpa` (full self-attention) for the scaling sweep,
  `onnxrt-official` (ONNX Runtime on the official code's model) and `onnxrt-reference` (on this
  package's reference-backend model) for the deployment run, `official` (the official code's
  training computation) and `reference` for the training steps.
- **GFLOP/s** and **% matmul**: FLOPs of the row (the unfused equivalent's matmuls) over the median,
  and that rate's share of a large matmul's rate measured in the same run. **GB/s** and **% copy BW**
  (only where the benchmark counts bytes: each input read once, each output written once) likewise
  against a large copy's bandwidth.
- **Timing.** pytest-benchmark suite: each provider's rounds run back to back (`benchmark.pedantic`,
  one warm-up round, 5–15 rounds, fewer for slow rows). Interleaved run (CPU, for machines whose speed
  drifts): every round calls each provider of a group once, in rotating order, so slow periods fall on
  all providers alike; under `torch.no_grad` (but the training steps).
- **More.** Every run, row by row: [`benchmarks/results/history.csv`](benchmarks/results/history.csv).
  Per-run narratives (how each run was made, what changed, how its figures compare):
  [`benchmarks/NOTES.md`](benchmarks/NOTES.md). Raw data: `benchmarks/results/*.json` and `*.log`.
"""


def render(runs: list[Run], notes_text: str = "") -> str:
    lines = [
        "# Benchmarks",
        "",
        ("Generated by `scripts/bench_report.py` from the raw JSON in `benchmarks/results/`; do not edit by "
         "hand. Regenerate with `python scripts/bench_report.py` (`make bench` runs the suite, then this)."),
        "",
        HOW_TO_READ.rstrip("\n"),
        "",
    ]
    devices: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if any(r.get("stats") for r in run.rows):
            devices[device_of(run.rows[0], run.data)].append(run)
    unrecorded = devices.pop(f"cpu: {UNRECORDED}", [])
    if unrecorded:
        names = ", ".join(f"`{r.path.name}`" for r in sorted(unrecorded, key=lambda r: r.path.name))
        lines += [f"CPU runs whose machine was not recorded are only in `history.csv`: {names}.", ""]
    for device in sorted(devices):
        dev_runs = sorted(devices[device], key=lambda r: (r.datetime, r.path.name))
        newest = dev_runs[-1]
        # A deployment or training-step run times other paths, not the layers again: it does not
        # make the layer and model runs before it "older".
        measured = [r for r in dev_runs if r.suite not in OWN_SUITES] or dev_runs
        latest: dict[tuple[str, str], Run] = {}
        for run in dev_runs:  # oldest first, so the latest of each (suite, dtype) wins
            latest[(run.suite, run.rows[0]["extra_info"].get("dtype") or "")] = run
        lines += [f"## {device}", ""]
        # newest first, so the current figures lead and older runs follow
        order = sorted(latest, key=lambda k: (latest[k].datetime, latest[k].path.name), reverse=True)
        shown: set[tuple[str, str]] = set()
        for key in order:
            run_newest = newest if key[0] in OWN_SUITES else measured[-1]
            lines += _section(latest[key], run_newest, notes_text, shown)
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------------
# Scaling plot (only with --plots, and only where the PNG is missing: matplotlib's output varies
# between versions, so a committed plot is never redrawn; BENCHMARKS.md links it when it exists)


def plot_scaling(run: Run) -> Path | None:
    rows = [r for r in run.rows if r.get("stats") and "N" in r.get("extra_info", {})]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        series[r["extra_info"]["provider"]].append((r["extra_info"]["N"], r["stats"]["median"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for provider, pts in sorted(series.items()):
        pts.sort()
        ax.loglog([p[0] for p in pts], [p[1] * 1e3 for p in pts], "o-", label=provider)
    ax.set_xlabel("patches N (stage 1, image side / 4 squared)")
    ax.set_ylabel("median time per layer call (ms)")
    ax.set_title("PaCa (linear in N) vs full self-attention (quadratic)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = run.path.with_name(f"{run.path.stem}-scaling.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------------------------------


def outputs(files: list[Path]) -> dict[str, str]:
    """{'BENCHMARKS.md': text, 'history.csv': text} for these result files."""
    runs = load_runs(sorted(files, key=lambda p: p.name))
    notes_text = NOTES.read_text() if NOTES.exists() else ""
    return {"BENCHMARKS.md": render(runs, notes_text), "history.csv": render_history(runs)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path,
                        help="result JSON files (default: benchmarks/results/*.json)")
    parser.add_argument("--out-dir", type=Path, help="write BENCHMARKS.md and history.csv here")
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed files, write nothing")
    parser.add_argument("--plots", action="store_true",
                        help="draw the scaling sweep's PNG next to its JSON where it is missing")
    args = parser.parse_args(argv)
    files = [p.resolve() for p in args.files] or sorted(RESULTS.glob("*.json"))
    texts = outputs(files)
    targets = ({name: args.out_dir / name for name in texts} if args.out_dir else
               {"BENCHMARKS.md": ROOT / "BENCHMARKS.md", "history.csv": RESULTS / "history.csv"})
    if args.check:
        stale = [str(p) for name, p in targets.items() if not p.exists() or p.read_text() != texts[name]]
        for p in stale:
            print(f"stale: {p} (run python scripts/bench_report.py)")
        return 1 if stale else 0
    if args.plots:
        for run in load_runs(files):
            if run.path.with_name(f"{run.path.stem}-scaling.png").exists():
                continue
            if (png := plot_scaling(run)) is not None:
                print(f"wrote {png}")
    for name, path in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(texts[name])
    print(f"wrote {targets['BENCHMARKS.md']} and {targets['history.csv']} from {len(files)} result file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
