"""The dev + schnell hybrid's quality on mini-flux: the shipped ``recipes/hybrid.toml`` run on the mini-flux
models over held-out prompts, each of its three outputs (schnell draft, hybrid, dev alone) scored by the
``evaluate`` node's pixel checker.

    python bench/hybrid_quality.py [--prompts 16] [--out bench/hybrid_quality.json]

CPU is fine (mini-flux at 256×256).  The speed side of the comparison is ``fluxkiln bench --generation`` on a
GPU; this script says what each costs in adherence.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "hybrid.toml"
SCORED = {"draft": "schnell 4 steps", "refined": "hybrid: schnell 4 + dev 12 at 0.6", "dev_only": "dev 28 steps"}


def main(argv: list[str] | None = None) -> int:
    from fluxkiln.engine.runner import Engine
    from fluxkiln.plugins.miniflux.adherence import eval_prompts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--out", type=Path, default=HERE / "hybrid_quality.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fluxkiln-hybrid-") as tmp:
        recipe = Path(tmp) / "hybrid.toml"
        evaluators = "".join(f'\n[nodes.score_{n}]\ntype = "evaluate"\nimages = "@{n}"\nmetric = "mini"\n'
                             for n in SCORED)
        recipe.write_text(RECIPE.read_text() + evaluators)
        overrides = ["vars.dev_model=builtin:mini-flux", "vars.schnell_model=builtin:mini-flux-schnell",
                     'vars.megapixels="0.25"', f"vars.prompts={json.dumps(eval_prompts(args.prompts))}",
                     "vars.seed=1"]
        t0 = time.perf_counter()
        result = Engine(cache_dir=Path(tmp) / "cache").run(recipe, output=Path(tmp) / "run", overrides=overrides)
        if not result.ok:
            print([e.data for e in result.events if e.event == "node_failed"], file=sys.stderr)
            return 1
        rows = {}
        for node, label in SCORED.items():
            scores = json.loads((result.run_dir / f"score_{node}" / "scores.json").read_text())
            seconds = next(e.data["seconds"] for e in result.events if e.event == "node_finished" and e.node == node)
            rows[label] = {"mean": scores["mean"], "sample_seconds": seconds}
    out = {"date": time.strftime("%Y-%m-%d"), "prompts": args.prompts, "model": "builtin:mini-flux(-schnell)",
           "device": "cpu", "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    args.out.write_text(json.dumps(out, indent=2))
    for label, r in rows.items():
        print(f"{label:<36} {json.dumps(r['mean'])}  ({r['sample_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
