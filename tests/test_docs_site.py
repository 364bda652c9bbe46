"""The documentation site stays true: it builds strictly, its getting-started examples run, and its
generated pages match what they are generated from."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` (never with -q: quiet mode hides the warnings strict mode counts)."""
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra: pip install -e '.[test]'")
    pytest.importorskip("material", reason="mkdocs-material is in the test extra: pip install -e '.[test]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "-d", str(site)], capture_output=True, text=True, env=env, timeout=120)


def test_site_builds_strictly(tmp_path):
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    for page in ("getting-started", "recipes", "nodes", "training", "captioning-safety", "gpus", "performance",
                 "troubleshooting", "development", "plugins"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page


@pytest.mark.parametrize("bad", ["[gone](no-such-page.md)", "[gone](recipes.md#no-such-heading)"])
def test_strict_build_fails_on_a_broken_link(tmp_path, bad):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + f"\n{bad}\n")
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert bad.split("(")[1].rstrip(")").split("#")[0] in done.stdout + done.stderr


def written_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_no_page_speaks_of_issues_or_sessions():
    word = re.compile(r"\b(issues?|sessions?)\b", re.I)
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in written_pages()
             for n, line in enumerate(p.read_text().splitlines(), 1) if word.search(line)]
    assert not found, "user documentation speaks of issues or sessions:\n" + "\n".join(found)


def shell_examples(page: Path) -> list[str]:
    """The commands of the page's ```bash blocks (run on CPU by the test); ```console blocks are not run."""
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_getting_started_marks_its_runnable_examples():
    commands = shell_examples(DOCS / "getting-started.md")
    assert "fluxkiln run recipes/quickstart.toml" in commands
    assert any(c.startswith("fluxkiln inspect") and "--write-recipe" in c for c in commands)


@pytest.mark.timeout(600)  # several fresh CLI processes on mini-flux; a host busy with other tests slows them
def test_getting_started_shell_examples_run_on_cpu(tmp_path, fresh_cache):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "recipes", work / "recipes")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLUXKILN_CACHE": str(fresh_cache),
           "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    for command in shell_examples(DOCS / "getting-started.md"):
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert (work / "again.toml").is_file() and (work / "runs" / "quickstart-seed8").is_dir()


def load_performance_generator():
    spec = importlib.util.spec_from_file_location("perf_docs", ROOT / "bench" / "perf_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stale(name: str, page: str, rendered: str) -> str:
    """What the generator would change in a page (a failure far from here, e.g. on a GPU machine, says what)."""
    import difflib

    diff = difflib.unified_diff(page.splitlines(), rendered.splitlines(), f"docs/{name}", "generated", n=1,
                                lineterm="")
    newest = sorted(p.name for p in (ROOT / "bench").glob("*.json"))
    return f"run: python bench/perf_docs.py\n{chr(10).join(list(diff)[:40])}\nbench JSON files: {newest}"


def test_performance_tables_are_generated_from_the_committed_bench_json():
    gen = load_performance_generator()
    page = (DOCS / "performance.md").read_text()
    rendered = gen.render(page, ROOT / "bench")
    assert rendered == page, _stale("performance.md", page, rendered)
    generation = (DOCS / "generation.md").read_text()
    rendered = gen.render(generation, ROOT / "bench", gen.GENERATION_TABLES)
    assert rendered == generation, _stale("generation.md", generation, rendered)


def test_performance_page_shows_the_newest_full_bench_run(tmp_path):
    gen = load_performance_generator()
    bench = tmp_path / "bench"
    bench.mkdir()
    shutil.copy(ROOT / "bench" / "watch_overhead.json", bench)
    for kind in ("generation", "e2e", "speed", "quality"):
        for path in (ROOT / "bench").glob(f"*-{kind}.json"):
            shutil.copy(path, bench)
    newest = json.loads(max((ROOT / "bench").glob("*-full.json")).read_text())
    older = {**newest, "date": "2020-01-01", "gpu": "Old Card"}
    newer = {**newest, "date": "2099-01-01", "gpu": "New Card",
             "sample": {**newest["sample"], "dev-lossless": {**newest["sample"]["dev-lossless"], "s_per_image": 1.234}}}
    (bench / "old-card-2020-01-01-full.json").write_text(json.dumps(older))
    (bench / "new-card-2099-01-01-full.json").write_text(json.dumps(newer))
    page = gen.render((DOCS / "performance.md").read_text(), bench)
    assert "**New Card**" in page and "2099-01-01" in page and "Old Card" not in page
    assert "| dev, 28 steps, lossless (`go_fast = false`) | 1.234 |" in page
    with pytest.raises(ValueError, match="bench:sample:start"):
        gen.render(page.replace("<!-- bench:sample:start -->", ""), bench)


def test_many_gpu_table_is_generated_from_every_committed_gpus_json():
    gen = load_performance_generator()
    page = (DOCS / "gpus-many.md").read_text()
    assert gen.render(page, ROOT / "bench", gen.GPUS_TABLES) == page, "run: python bench/perf_docs.py"
    runs = sorted((ROOT / "bench").glob("*-gpus-*.json"))
    assert runs, "no committed fluxkiln bench --gpus results"
    for path in runs:
        d = json.loads(path.read_text())
        assert f"{d['gpus']} × {d['gpu']}, {d['date']} (`bench/{path.name}`)" in page
        for part, key, fmt in (("data_parallel", "speedup", ".2f"), ("ddp", "ratio", ".3f")):
            if part in d:  # `--parts` may leave a part out: its cell is a dash
                assert f"{d[part][key]:{fmt}}×" in page, (path.name, part)
