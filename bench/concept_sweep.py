"""Several ``bench/concept_probe.py`` settings in one process (a GPU call's worth), one JSON each and a table last.

    python bench/concept_sweep.py --out DIR [--device cuda] [--probe 32] 'SETTINGS' ['SETTINGS' ...]

Each SETTINGS is one probe's command line (e.g. ``--times shift --batch 8 --steps 600``); ``--device``,
``--probe`` and ``--json`` are added to every one.  A setting that fails is reported and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import concept_probe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--probe", default="32")
    ap.add_argument("settings", nargs="+")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for n, setting in enumerate(args.settings, 1):
        path = args.out / f"probe-{n}.json"
        t0 = time.perf_counter()
        try:
            concept_probe.main([*shlex.split(setting), "--device", args.device, "--probe", args.probe,
                                "--json", str(path)])
            row = json.loads(path.read_text())
        except (Exception, SystemExit) as err:  # noqa: BLE001 - one broken setting (or its argparse error) must not lose the others
            row = {"error": f"{type(err).__name__}: {err}"}
        row["setting"], row["seconds"] = setting, round(time.perf_counter() - t0, 1)
        results.append(row)
        (args.out / "sweep.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n| setting | s | CPU units | training captions | new prompts | leakage | vocabulary shape drop |\n"
          "|---|---|---|---|---|---|---|")
    for row in results:
        cells = [str(row.get(k, row.get("error", "-"))) for k in concept_probe.SUMMARY_ROWS]
        drops = ", ".join(f"{v} ({k.rsplit(' ', 1)[-1]})" for k, v in row.items() if k.startswith("vocabulary shape drop"))
        print(f"| {row['setting']} | {row['seconds']} | {row.get('cpu_units', '-')} | " + " | ".join(cells)
              + f" | {drops or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
