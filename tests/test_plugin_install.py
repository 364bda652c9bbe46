"""The example plugin and a `fluxkiln new-plugin` skeleton install with pip into a fresh venv and work there.

The venv is new and empty; a ``.pth`` file makes the folders that hold fluxkiln
and its dependencies visible in it, in the running interpreter's order
(installing torch into a new venv is too slow for a test).  pip runs offline (``--no-index``) and without resolving
dependencies (``--no-deps``); the installed plugin's own requirements are then
checked against what the venv imports, so its metadata is checked too.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fluxkiln.engine.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "plugins" / "example"


def _outer_site_dirs() -> list[str]:
    """Where this interpreter finds fluxkiln and its dependencies, in the order it searches them.

    Site-packages folders and the PYTHONPATH entries: on the GPU machine the wheels live in a ``pip --target``
    folder on PYTHONPATH that shadows older copies in site-packages (an older diffusers there made pip's
    check of fluxkiln's requirements fail), so the venv must see them first, as this interpreter does.
    """
    def key(path: str) -> str:
        return str(Path(path).resolve())

    wanted = [*os.environ.get("PYTHONPATH", "").split(os.pathsep), *site.getsitepackages(),
              sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
              str(metadata.distribution("fluxkiln").locate_file(""))]
    wanted_keys = {key(d) for d in wanted if d}
    ordered = [key(d) for d in sys.path if d and key(d) in wanted_keys]
    return list(dict.fromkeys([*ordered, *(key(d) for d in wanted if d)]))


# run inside the venv: why pip cannot build a plugin there, offline and without build isolation ("" if it can)
_BUILD_BACKEND_CHECK = """
from importlib.util import find_spec
if find_spec("setuptools") is None:
    print("setuptools (the plugins' build backend) is not installed")
elif find_spec("setuptools.command.bdist_wheel") is None and find_spec("wheel") is None:
    print("this setuptools (< 70.1) needs the `wheel` package to build wheels, and it is not installed")
"""


# run inside the venv: the requirements of an installed distribution, each with the version the venv sees
_INSTALLED_REQUIREMENTS = """
import json, re, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
reqs = metadata.distribution(sys.argv[1]).requires or []
print(json.dumps([(r, version(re.match(r"[A-Za-z0-9._-]+", r).group(0))) for r in reqs]))
"""


class Venv:
    def __init__(self, root: Path):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
        self.root = root
        self.python = str(root / "bin" / "python")
        site = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        lines = [f"import site; site.addsitedir({d!r})" for d in _outer_site_dirs()]
        (Path(site) / "_fluxkiln_outer.pth").write_text("\n".join(lines) + "\n")
        self.site = Path(site)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "FLUXKILN_PLUGINS", "FLUXKILN_PLUGIN_MODULES", "PYTEST_ADDOPTS")}
        self.env |= {"FLUXKILN_CACHE": str(root / "cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                     "PIP_NO_INPUT": "1", "COLUMNS": "200"}

    def run(self, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def missing_build_backend(self) -> str:
        return self.run("-c", _BUILD_BACKEND_CHECK, cwd=self.root).stdout.strip()

    def pip_install(self, source: Path) -> None:
        # --no-deps: pip's resolver would re-check the requirements of every installed dependency too (torch's
        # own setuptools pin against whichever setuptools comes first on the path), which is not what this test
        # is about; the plugin's own requirements are checked against what the venv imports instead
        res = self.run("-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-q", str(source),
                       cwd=source.parent)
        assert res.returncode == 0, res.stdout + res.stderr
        name = tomllib.loads((source / "pyproject.toml").read_text())["project"]["name"]
        assert self.unmet_requirements(name) == []

    def unmet_requirements(self, dist: str) -> list[str]:
        """The requirements of the installed ``dist`` that the distributions the venv sees do not satisfy."""
        res = self.run("-c", _INSTALLED_REQUIREMENTS, dist, cwd=self.root)
        assert res.returncode == 0, res.stderr
        unmet = []
        for line, have in json.loads(res.stdout):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra's requirement (pytest for `[test]`)
            if have is None or not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{line} (installed: {have})")
        return unmet

    def fluxkiln(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return self.run("-m", "fluxkiln.engine.cli", *args, cwd=cwd)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv with the example plugin pip-installed (from a copy, so the repo stays clean)."""
    root = tmp_path_factory.mktemp("plugin-venv")
    v = Venv(root / "venv")
    why = v.missing_build_backend()
    if why:  # an offline GPU machine without them carried (bench/gpu_suite.sh installs them when they are)
        pytest.skip(f"pip cannot build a plugin offline here: {why}")
    src = root / "src" / "example"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    v.pip_install(src)
    v.example_src = src
    return v


def test_example_plugin_installs_and_its_nodes_are_listed(venv, tmp_path):
    assert (venv.site / "fluxkiln_example" / "images.py").exists()
    assert (venv.site / "fluxkiln_example-0.1.0.dist-info" / "entry_points.txt").read_text().split() == \
        ["[fluxkiln]", "example", "=", "fluxkiln_example"]
    res = venv.fluxkiln("plugins", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    [example] = [p for p in json.loads(res.stdout) if p["name"] == "example"]
    assert example["distribution"] == "fluxkiln-example" and example["version"] == "0.1.0"
    assert example["source"] == "entry point" and example["error"] is None
    assert example["node_types"] == ["load_images", "resize", "prompt_sweep"]

    listing = venv.fluxkiln("nodes", cwd=tmp_path).stdout.splitlines()
    assert "resize             Resize or upscale images with Lanczos (or another filter), keeping the aspect " \
           "ratio.  [example]" in listing
    doc = json.loads(venv.fluxkiln("nodes", "prompt_sweep", "--json", cwd=tmp_path).stdout)
    assert [k["name"] for k in doc["keys"]] == ["template", "values", "mode", "max_prompts", "unique"]

    # not installed in the test environment itself: the venv is what made it visible
    assert "example" not in cli_plugin_names()


def cli_plugin_names() -> set[str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_main(["plugins", "--json"])
    return {p["name"] for p in json.loads(out.getvalue())}


def test_example_nodes_run_in_a_recipe(venv, tmp_path):
    from fluxkiln.engine.testing import make_images

    (tmp_path / "pics").mkdir()
    for i, item in enumerate(make_images(2, 40, 30)):
        item.image.save(tmp_path / "pics" / f"p{i}.png")
    recipe = tmp_path / "upscale.toml"
    recipe.write_text("""
[recipe]
name = "upscale"
plugins = ["example"]

[nodes.pics]
type = "load_images"
path = "pics"

[nodes.big]
type = "resize"
images = "@pics"
scale = 2.0

[nodes.saved]
type = "save"
images = "@big"
output_format = "png"

[nodes.prompts]
type = "prompt_sweep"
template = "a {thing} at {time}"
values = { thing = ["lighthouse", "harbour"], time = ["dawn", "dusk"] }
""")
    assert venv.fluxkiln("validate", str(recipe), cwd=tmp_path).returncode == 0
    res = venv.fluxkiln("run", str(recipe), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert events[-1]["status"] == "ok"
    assert events[-1]["nodes"] == {"pics": "ran", "big": "ran", "saved": "ran", "prompts": "ran"}
    from PIL import Image

    saved = sorted((tmp_path / "runs" / "upscale").glob("saved_*.png"))
    assert [Image.open(p).size for p in saved] == [(80, 60), (80, 60)]
    prompts = (tmp_path / "runs" / "upscale" / "prompts" / "prompts.txt").read_text().splitlines()
    assert prompts == ["a lighthouse at dawn", "a lighthouse at dusk", "a harbour at dawn", "a harbour at dusk"]

    # the plugin's recipe check is active in the installed plugin too
    recipe.write_text(recipe.read_text().replace("scale = 2.0", ""))
    bad = venv.fluxkiln("validate", str(recipe), cwd=tmp_path)
    assert bad.returncode == 2 and "node 'big': resize needs `scale`, or `width` and/or `height`" in bad.stderr


def test_example_plugin_tests_pass_against_the_installed_package(venv):
    # run from tests/ with pythonpath emptied: fluxkiln_example is imported from the venv, not the source folder
    tests = venv.example_src / "tests"
    where = venv.run("-c", "import fluxkiln_example; print(fluxkiln_example.__file__)", cwd=tests)
    assert where.stdout.strip() == str(venv.site / "fluxkiln_example" / "__init__.py")
    res = venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "pythonpath=", ".", cwd=tests)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_new_plugin_skeleton_installs_and_its_tests_pass(venv, tmp_path, capsys):
    assert cli_main(["new-plugin", "fluxkiln-sepia", "--dir", str(tmp_path)]) == 0
    assert "node type 'sepia'" in capsys.readouterr().out
    skeleton = tmp_path / "fluxkiln-sepia"
    venv.pip_install(skeleton)

    res = venv.fluxkiln("plugins", "--json", cwd=tmp_path)
    [sepia] = [p for p in json.loads(res.stdout) if p["name"] == "sepia"]
    assert (sepia["distribution"], sepia["version"], sepia["node_types"], sepia["error"]) == \
        ("fluxkiln-sepia", "0.1.0", ["sepia"], None)
    assert venv.fluxkiln("validate", str(skeleton / "example.toml"), cwd=tmp_path).returncode == 0

    tests = venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "pythonpath=", ".", cwd=skeleton / "tests")
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "4 passed" in tests.stdout
