"""Hostile recipes: `validate` answers every input with exit 0 or 2 and a located message, never a traceback."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clihelp import fluxkiln
from fluxkiln.engine.registry import Registry
from fluxkiln.engine.validate import check_text
from helpers import textnodes


def _deep(n: int) -> str:
    return "[" * n + "1" + "]" * n


HEAD = '[recipe]\nname = "x"\n'
CASES = {
    "deep-var": (HEAD + f"[vars]\nv = {_deep(450)}\n[nodes.a]\ntype = \"const\"\nvalue = \"${{v}}\"\n",
                 "nested more than", 4),
    "deep-toml": (HEAD + f"[nodes.a]\ntype = \"const\"\nvalue = {_deep(700)}\n", "nested too deeply", 5),
    "deep-inline-table": (HEAD + "[nodes.a]\ntype = \"const\"\nvalue = " + "{a=" * 700 + "1" + "}" * 700 + "\n",
                          "nested too deeply", 5),
    "no-such-user": (HEAD + '[nodes.a]\ntype = "read_file"\npath = "~nosuchuser/data.zip"\n', "no such user", 5),
    "long-component": (HEAD + f'[nodes.a]\ntype = "read_file"\npath = "{"a" * 300}/x.txt"\n',
                       "longer than 255", 5),
    "nul-in-path": (HEAD + '[nodes.a]\ntype = "read_file"\npath = "a\\u0000b"\n', "NUL character", 5),
    "output-dir-no-user": ('[recipe]\nname = "x"\noutput_dir = "~nosuchuser/out"\n[nodes.a]\ntype = "const"\n',
                           "no such user", 3),
    "fifo": (HEAD + '[nodes.a]\ntype = "read_file"\npath = "fifo"\n', "it is a FIFO", 5),
    "dev-zero": (HEAD + '[nodes.a]\ntype = "read_file"\npath = "/dev/zero"\n', "character device", 5),
    "link-loop": (HEAD + '[nodes.a]\ntype = "read_file"\npath = "loop"\n', "symbolic link loop", 5),
    "dangling-link": (HEAD + '[nodes.a]\ntype = "read_file"\npath = "dangling"\n', "dangling symbolic link", 5),
    "deep-set": (HEAD + '[nodes.a]\ntype = "const"\n', "nested more than", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_hostile_recipe_exits_2_with_located_message(case, tmp_path, fresh_cache):
    import os

    text, fragment, line = CASES[case]
    (tmp_path / "r.toml").write_text(text)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing.txt")
    extra = ["--set", f"nodes.a.value={_deep(40)}"] if case == "deep-set" else []
    res = fluxkiln("validate", "r.toml", *extra, cwd=tmp_path, cache=fresh_cache, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and fragment in res.stderr, res.stderr
    if line is not None:
        assert f"r.toml:{line}:" in res.stderr, res.stderr
    assert len(res.stderr) < 2000, "a hostile value must not be echoed in full"


# ----------------------------------------------------------------------------- property-based fuzzing
@pytest.fixture(scope="module")
def registry():
    return Registry.load(extra=[textnodes], entry_points=False)


NASTY = ["@a", "@@x", "@a.nope", "@", "${v}", "${nope}", "$${v}", "~nosuchuser/data.zip", "~", "a" * 300 + "/x",
         "/dev/zero", "/dev/null", "/", ".", "..", "a\x00b", "\x1b[31m", "\u202e", "C:\\x", "$HF_TOKEN",
         "builtin:tiny-flux", "x" * 5000]
KEYS = ["type", "value", "repeat", "scale", "mode", "left", "right", "sep", "path", "source", "max_images",
        "name", "output_dir", "plugins", "seed", "gpu_hour_price", "v"]
TYPES = ["const", "concat", "read_file", "dataset", "nope", ""]

scalars = st.one_of(st.sampled_from(NASTY), st.text(max_size=20), st.integers(), st.booleans(),
                    st.floats(allow_nan=True), st.sampled_from(TYPES))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=8)
tables = st.dictionaries(st.sampled_from(KEYS), values, max_size=5)
documents = st.fixed_dictionaries({
    "recipe": st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
    "vars": st.dictionaries(st.sampled_from(KEYS), values, max_size=3),
    "nodes": st.dictionaries(st.sampled_from(["a", "b", "c", "1bad", "x y"]), tables, max_size=3),
})


@st.composite
def recipe_texts(draw) -> str:
    """TOML recipes built from hostile parts, then sometimes cut, spliced or deepened as raw text."""
    text = tomli_w.dumps(draw(documents))
    how = draw(st.sampled_from(["as-is", "splice", "cut", "deep"]))
    at = draw(st.integers(0, len(text)))
    if how == "splice":
        text = text[:at] + draw(st.text(alphabet=string.printable + "\x00é\u202e", max_size=30)) + text[at:]
    elif how == "cut":
        text = text[:at]
    elif how == "deep":
        n = draw(st.sampled_from([31, 33, 400, 520, 2000]))
        opener = draw(st.sampled_from(["[", "{a="]))
        closer = "]" if opener == "[" else "}"
        text += f"\n[nodes.deep]\ntype = \"const\"\nvalue = {opener * n}1{closer * n}\n"
    return text


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=recipe_texts(), overrides=st.lists(st.sampled_from(
    ["nodes.a.value=x", "nodes.a.value=" + _deep(40), "vars.v=[1", "recipe.name=@", "nodes.zz.k=1", "bad"]),
    max_size=2))
def test_fuzzed_recipes_give_located_problems_never_exceptions(registry, text, overrides):
    checked, problems = check_text(text, registry, Path("/fuzz/r.toml"), overrides)
    assert (checked is None) == bool(problems)
    for p in problems:
        assert p.message and p.file in ("/fuzz/r.toml", "--set")
        assert p.format()


# ----------------------------------------------------------------------------- non-regular files at run time
@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_run_refuses_fifo_and_device_without_hanging(target, tmp_path, fresh_cache):
    import os

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "r.toml").write_text(HEAD + f'[nodes.a]\ntype = "read_file"\npath = "{target}"\n')
    res = fluxkiln("run", "r.toml", cwd=tmp_path, cache=fresh_cache, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "r.toml:5: node 'a' key 'path'" in res.stderr and "not a regular file" in res.stderr, res.stderr


def test_hashing_refuses_a_fifo_swapped_in_after_validation(tmp_path):
    """The hasher checks the file type on the open descriptor: a FIFO never blocks it, a device never feeds it."""
    import os
    import subprocess
    import sys

    os.mkfifo(tmp_path / "fifo")
    code = ("import sys; from pathlib import Path; from fluxkiln.engine.fingerprint import FileHasher, NotRegularFile\n"
            "for p in (Path(sys.argv[1]), Path('/dev/zero')):\n"
            "    try: FileHasher().path(p)\n"
            "    except NotRegularFile as e: print('refused', e)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fifo")], capture_output=True, text=True,
                         timeout=30)
    assert res.stdout.count("refused") == 2 and "FIFO" in res.stdout and "character device" in res.stdout, res


def test_validate_refuses_a_recipe_that_is_a_fifo_without_blocking(tmp_path, fresh_cache):
    import os

    os.mkfifo(tmp_path / "r.toml")
    res = fluxkiln("validate", "r.toml", cwd=tmp_path, cache=fresh_cache, timeout=30)
    assert res.returncode == 2 and "it is a FIFO" in res.stderr and "Traceback" not in res.stderr, res.stderr
