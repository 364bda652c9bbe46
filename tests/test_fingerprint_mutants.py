"""Fingerprints, exactly: the canonical form, the identity, the reasons a node re-runs, the file-hash index."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fluxkiln.engine import devmode
from fluxkiln.engine.fingerprint import FileHasher, canonical, diff_reasons, digest, identity


def test_canonical_form_is_sorted_compact_unicode_and_stringifies_the_rest():
    assert canonical({"b": 1, "a": ["é", 1.5]}) == '{"a":["é",1.5],"b":1}'
    assert canonical({"p": Path("/x/y")}) == '{"p":"/x/y"}'
    assert digest({"b": 1, "a": 2}) == hashlib.sha256(b'{"a":2,"b":1}').hexdigest() == digest({"a": 2, "b": 1})


def test_identity_holds_everything_that_decides_a_result():
    ident = identity("t", "2", {"k": 1}, {"in": "fp"}, {"f": "h"})
    assert ident == {"type": "t", "version": "2", "params": {"k": 1}, "inputs": {"in": "fp"}, "files": {"f": "h"}}


def test_reasons_name_every_difference_in_words():
    old = identity("t", "1", {"a": 1, "b": "x" * 50, "gone": 1}, {"in": "f1", "same": "s"},
                   {"k1": "h1", "(model)": "m1", "k2": "h"})
    new = identity("t", "2", {"a": 2, "b": "y" * 50, "new": [1]}, {"in": "f2", "same": "s"},
                   {"k1": "h2", "(model)": "m2", "k2": "h"})
    assert diff_reasons(old, new, {"k1": "data.txt"}) == [
        "implementation version changed 1 -> 2",
        "param 'a' changed 1 -> 2",
        "param 'b' changed " + repr("x" * 50)[:37] + "... -> " + repr("y" * 50)[:37] + "...",
        "param 'gone' changed 1 -> null",
        "param 'new' changed null -> [1]",
        "input 'in' changed",
        "model changed",
        "file 'data.txt' changed",
    ]
    assert diff_reasons(identity("u", "1", {}, {}, {}), identity("t", "2", {}, {}, {}), {}) == ["type changed u -> t"]
    assert diff_reasons(None, new, {}) == [] and diff_reasons({}, new, {}) == []
    assert diff_reasons(new, new, {}) == []
    assert diff_reasons(identity("t", "1", {}, {}, {"k": "h"}), identity("t", "1", {}, {}, {"k": "i"}), {}) == [
        "file 'k' changed"]


def test_reasons_say_when_development_mode_switched():
    plain = identity("t", "1", {}, {}, {})
    dev = identity("t", "1", {}, {}, {devmode.LABEL: "code"})
    assert diff_reasons(plain, dev, {}) == ["development mode (FLUXKILN_DEV) switched on"]
    assert diff_reasons(dev, plain, {}) == ["development mode (FLUXKILN_DEV) switched off"]
    other = identity("t", "1", {}, {}, {devmode.LABEL: "changed code"})
    assert diff_reasons(dev, other, {}) == [f"{devmode.LABEL[1:-1]} changed"]


def test_file_hashes_are_remembered_by_size_and_time_and_saved(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"one")
    index = tmp_path / "index" / "hashes.json"
    hasher = FileHasher(index)
    assert hasher.file(f) == hashlib.sha256(b"one").hexdigest()
    stamp = f.stat()
    f.write_bytes(b"two")  # same size: with the old time the remembered hash stands
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert hasher.file(f) == hashlib.sha256(b"one").hexdigest()
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert hasher.file(f) == hashlib.sha256(b"two").hexdigest()
    hasher.save()
    again = FileHasher(index)
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    f.write_bytes(b"333")
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert again.file(f) == hashlib.sha256(b"two").hexdigest(), "the saved index is read back"
