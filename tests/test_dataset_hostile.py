"""Hostile dataset sources: caps on every byte read, odd names, links, duplicate and dirty captions."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
import zipfile

import pytest

from test_dataset_node import _failure, _png, _run


def _tar_member(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    return ti.tobuf(format=tarfile.GNU_FORMAT)


def _tar_gz_with_skipped_zeros(path, zeros: int, chunk: int = 16 * 2**20) -> None:
    """A .tar.gz holding ``skip.bin`` (``zeros`` zero bytes, not an image: skipped) and then ``a.png``.

    Written as concatenated gzip members, each the same compressed block of ``chunk`` zeros, so that a few MB
    on disk hold gigabytes without compressing them here."""
    assert zeros % chunk == 0
    block = gzip.compress(b"\0" * chunk, compresslevel=9, mtime=0)
    png = _png()
    tail = (b"\0" * 0 + _tar_member("a.png", len(png)) + png + b"\0" * (-len(png) % 512) + b"\0" * 1024)
    with open(path, "wb") as f:
        f.write(gzip.compress(_tar_member("skip.bin", zeros), mtime=0))
        for _ in range(zeros // chunk):
            f.write(block)
        f.write(gzip.compress(tail, mtime=0))


def test_huge_skipped_tar_member_is_refused_fast(tmp_path, fresh_cache):
    src = tmp_path / "bomb.tar.gz"
    _tar_gz_with_skipped_zeros(src, 4 * 2**30)  # 4 GiB inside, default max_total_bytes is 2 GiB
    assert src.stat().st_size < 8 * 2**20
    t0 = time.perf_counter()
    msg = _failure(_run(tmp_path, fresh_cache, str(src)))
    assert time.perf_counter() - t0 < 20
    assert "skip.bin" in msg and "max_total_bytes" in msg and "skipped members included" in msg, msg


def test_skipped_tar_bytes_count_against_the_cap_and_pass_under_it(tmp_path, fresh_cache):
    src = tmp_path / "skips.tar.gz"
    _tar_gz_with_skipped_zeros(src, 64 * 2**20)
    msg = _failure(_run(tmp_path, fresh_cache, str(src), max_total_bytes=32 * 2**20))
    assert "skip.bin" in msg and "max_total_bytes" in msg, msg
    t0 = time.perf_counter()
    res = _run(tmp_path, fresh_cache, str(src), max_total_bytes=128 * 2**20)
    assert res.status == "ok", res.nodes
    assert time.perf_counter() - t0 < 30, "skipping a member must cost its decompression only"
    listing = json.loads((tmp_path / "run" / "data" / "dataset.json").read_text())
    assert [i["name"] for i in listing["items"]] == ["a.png"]
    assert listing["skipped"][0]["name"] == "skip.bin"


def test_skipped_zip_members_count_against_the_cap(tmp_path, fresh_cache):
    src = tmp_path / "skips.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", _png())
        zf.writestr("notes.bin", b"\0" * (8 * 2**20))
    msg = _failure(_run(tmp_path, fresh_cache, str(src), max_total_bytes=4 * 2**20))
    assert "notes.bin" in msg and "max_total_bytes" in msg, msg


def test_tar_stream_is_capped_even_for_members_without_data(tmp_path, fresh_cache):
    """Header blocks count too: empty hidden members with 10 kB names (GNU long-name blocks) stop at the cap
    on bytes read from the stream (max_total_bytes plus 1 kB a member for headers plus 1 MiB)."""
    src = tmp_path / "headers.tar.gz"
    with tarfile.open(src, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        for i in range(500):
            tf.addfile(tarfile.TarInfo(f".h{i:05d}" + "x" * 10_000))
    msg = _failure(_run(tmp_path, fresh_cache, str(src), max_total_bytes=1, max_files=600))
    assert "decompresses to more than" in msg, msg


# ----------------------------------------------------------------------------- names and links
def test_non_utf8_names_are_named_with_a_fix(tmp_path, fresh_cache):
    png = _png()
    tar = tmp_path / "latin.tar"
    with tarfile.open(tar, "w", encoding="latin-1", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("caf\xe9.png")
        ti.size = len(png)
        tf.addfile(ti, io.BytesIO(png))
    msg = _failure(_run(tmp_path, fresh_cache, str(tar)))
    assert "caf\\xe9.png" in msg and "not valid UTF-8" in msg and "convmv" in msg, msg

    zf_path = tmp_path / "flagged.zip"
    with zipfile.ZipFile(zf_path, "w") as zf:
        zf.writestr("abc\xe9f.png", png)  # a non-ASCII name: zipfile sets the "names are UTF-8" flag
    zf_path.write_bytes(zf_path.read_bytes().replace("abc\xe9f.png".encode(), b"abc\xff\xfef.png"))
    msg = _failure(_run(tmp_path, fresh_cache, str(zf_path)))
    assert "abc\\xff\\xfef.png" in msg and "not valid UTF-8" in msg, msg

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png)
    with open(os.path.join(os.fsencode(folder), b"bad\xff.png"), "wb") as f:
        f.write(png)
    res = _run(tmp_path, fresh_cache, str(folder))
    msg = _failure(res)
    assert "bad\\xff.png" in msg and "not valid UTF-8" in msg, msg
    assert not any("Traceback" in str(e.data) for e in res.events)


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_folder_link_loop_and_dangling_link_get_proper_messages(kind, tmp_path, fresh_cache):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "ok.png").write_bytes(_png())
    if kind == "loop":
        (folder / "x.png").symlink_to(folder / "y.png")
        (folder / "y.png").symlink_to(folder / "x.png")
    else:
        (folder / "x.png").symlink_to(folder / "gone.png")
    msg = _failure(_run(tmp_path, fresh_cache, str(folder)))
    want = "symbolic link loop" if kind == "loop" else "dangling symbolic link"
    assert "'x.png'" in msg and want in msg, msg
    assert "relative to the recipe" not in msg


# ----------------------------------------------------------------------------- captions
def test_duplicate_caption_files_are_refused_like_duplicate_images(tmp_path, fresh_cache):
    src = tmp_path / "dup.zip"
    with zipfile.ZipFile(src, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("x.png", _png())
        zf.writestr("x.txt", "first")
        zf.writestr("x.txt", "second")
    msg = _failure(_run(tmp_path, fresh_cache, str(src)))
    assert "'x.txt'" in msg and "second caption" in msg, msg


def test_captions_with_nul_ansi_and_bidi_are_cleaned_and_logged(tmp_path, fresh_cache):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / "a.txt").write_text("a \x1b[31mred\x1b[0m fox\x00 \u202eevil\u202c here")
    res = _run(tmp_path, fresh_cache, str(folder))
    assert res.status == "ok", res.nodes
    listing = json.loads((tmp_path / "run" / "data" / "dataset.json").read_text())
    assert listing["items"][0]["caption"] == "a red fox evil here"
    logs = [e.data["message"] for e in res.events if e.event == "node_log"]
    line = next(m for m in logs if m.startswith("caption a.txt"))
    assert "ANSI escape" in line and "bidirectional" in line and "control characters" in line, logs


def test_edited_caption_file_with_escapes_is_cleaned_logged_and_left_as_written(tmp_path):
    from test_caption_helpers import caption_recipe, engine, make_images

    make_images(tmp_path / "data", {"a": ((1, 2, 3), "first")})
    eng = engine(tmp_path)
    recipe = caption_recipe(tmp_path, model="acme/not-downloaded")
    assert eng.run(recipe, output=tmp_path / "runs" / "t").ok
    edited = tmp_path / "runs" / "t" / "cap" / "a.txt"
    edited.write_text("\x1b[2Jmy \u202eown\x00 words\n")
    result = eng.run(recipe, output=tmp_path / "runs" / "t", force=["cap"])
    assert result.ok
    assert [it.caption for it in result.outputs["cap"]["output"].items] == ["my own words"]
    logs = [e.data["message"] for e in result.events if e.event == "node_log"]
    assert any(m.startswith("caption file a.txt: removed 1 ANSI") and "NUL" in m for m in logs), logs
    assert edited.read_text() == "\x1b[2Jmy \u202eown\x00 words\n"
