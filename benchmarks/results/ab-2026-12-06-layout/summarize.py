"""Old vs new code of the architecture change (issue: layers point one way), on one machine.

layer-{old,new}-{1..6}.json: benchmarks/interleaved.py --rounds 15 --models '' (the layer groups),
models-{old,new}-{1..3}.json: --rounds 12 --no-layer --models tiny,small, processes alternating old,
new, old, new, ...; old = main at 0a386b3 (before the change), new = main at 78cc184 (pairs 1-4 and
the models) and at a52a825 (layer pairs 5-6, after the plans moved to nn/_fusion.py); each file's
commit_info says which. full-old.json is the old code's full run (layers + Tiny + Small) next to
../cpu-2026-12-06-interleaved-layout.json.

    python benchmarks/results/ab-2026-12-06-layout/summarize.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(name: str) -> dict[tuple[str, str], float]:
    data = json.loads((HERE / name).read_text())
    return {(r["group"], r["extra_info"]["provider"]): r["stats"]["median"] for r in data["benchmarks"]}


def compare(kind: str, pairs: int, providers: dict[str, str]) -> None:
    runs = [(load(f"{kind}-old-{i}.json"), load(f"{kind}-new-{i}.json")) for i in range(1, pairs + 1)]
    for group in sorted({g for g, _ in runs[0][1]}):
        for p, base in providers.items():
            if (group, p) not in runs[0][1]:
                continue
            old = [o[(group, base)] / o[(group, p)] for o, _ in runs]
            new = [n[(group, base)] / n[(group, p)] for _, n in runs]
            speed = [o[(group, p)] / n[(group, p)] for o, n in runs]
            print(f"{group.split(' ')[0]:<48} {p:<18} x{base}: old {statistics.median(old):.2f} "
                  f"({min(old):.2f}-{max(old):.2f}), new {statistics.median(new):.2f} ({min(new):.2f}-"
                  f"{max(new):.2f}); new/old speed per pair {', '.join(f'{x:.2f}' for x in speed)}")


compare("layer", 6, {"paca-cpu": "official", "paca-cpu-compiled": "official-compiled"})
compare("models", 3, {"cpu": "reference", "cpu-compiled": "reference-compiled"})
