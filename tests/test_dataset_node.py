"""The dataset node: folders, zips and tars in; hostile archives refused with a message naming the member."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from fluxkiln.engine.runner import Engine


def _png(color=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG file whose header claims an enormous image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _run(tmp_path: Path, cache: Path, source: str, **params):
    extra = "".join(f"{k} = {v!r}\n" for k, v in params.items())
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[recipe]\nname = "ds"\n\n[nodes.data]\ntype = "dataset"\nsource = "{source}"\n{extra}')
    return Engine(cache_dir=cache).run(recipe, output=tmp_path / "run")


def _failure(result) -> str:
    assert result.status == "failed", result.nodes
    ev = next(e for e in result.events if e.event == "node_failed")
    return ev.data["error"] + " | " + (ev.data.get("hint") or "")


def _no_stray_files(tmp_path: Path, marker: str) -> None:
    stray = [p for p in [*tmp_path.rglob(f"*{marker}*"), *tmp_path.parent.glob(f"*{marker}*")]
             if p.suffix not in (".zip", ".tar", ".gz")]
    assert stray == [], f"files written outside the target: {stray}"
    files = tmp_path / "run" / "data" / "files"
    assert not files.exists(), "a refused source must not leave extracted files"
    assert not list((tmp_path / "run" / "data").glob(".files-tmp-*")), "staging folder left behind"


def _good_folder(root: Path) -> Path:
    root.mkdir()
    (root / "a.png").write_bytes(_png((250, 0, 0)))
    (root / "a.txt").write_text("a red  square\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.jpg").write_bytes(_jpeg())
    (root / ".hidden.png").write_bytes(_png())
    (root / "._a.png").write_bytes(b"resource fork junk")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "c.png").write_bytes(b"junk")
    (root / "notes.md").write_text("ignored")
    return root


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 250)).save(buf, format="JPEG")
    return buf.getvalue()


def test_folder_zip_and_tar_give_the_same_dataset(tmp_path, fresh_cache):
    folder = _good_folder(tmp_path / "imgs")
    (tmp_path / "f").mkdir()
    res = _run(tmp_path / "f", fresh_cache, str(folder))
    assert res.ok, res.events
    ds = res.outputs["data"]["output"]
    assert [(it.name, it.caption) for it in ds.items] == [("a.png", "a red square"), ("sub/b.jpg", None)]
    assert all(Path(it.path).is_file() for it in ds.items)
    skipped = (tmp_path / "f" / "run" / "data" / "dataset.json").read_text()
    assert "__MACOSX" in skipped and "hidden file" in skipped and "notes.md" in skipped

    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    (tmp_path / "z").mkdir()
    rz = _run(tmp_path / "z", fresh_cache, str(zpath))
    assert rz.ok
    assert rz.outputs["data"]["output"].fingerprint == ds.fingerprint

    tpath = tmp_path / "imgs.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        tf.add(folder, arcname="imgs")
    (tmp_path / "t").mkdir()
    rt = _run(tmp_path / "t", fresh_cache, str(tpath))
    assert rt.ok
    names = [it.name for it in rt.outputs["data"]["output"].items]
    assert names == ["imgs/a.png", "imgs/sub/b.jpg"]

    # The fingerprint follows the content: a changed caption changes it.
    (folder / "a.txt").write_text("a blue square")
    (tmp_path / "f2").mkdir()
    r2 = _run(tmp_path / "f2", fresh_cache, str(folder))
    assert r2.outputs["data"]["output"].fingerprint != ds.fingerprint


def _zip_with(path: Path, name: str, data: bytes, mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", _png())
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name,expect", [
    ("../evil_dotdot.png", "'..'"),
    ("imgs/../../evil_dotdot2.png", "'..'"),
    ("/tmp/evil_abs.png", "absolute"),
    ("C:/evil_drive.png", "absolute"),
])
def test_zip_with_unsafe_paths_is_refused(tmp_path, fresh_cache, name, expect):
    z = _zip_with(tmp_path / "bad.zip", name, _png())
    res = _run(tmp_path, fresh_cache, str(z))
    msg = _failure(res)
    assert name in msg and expect in msg
    _no_stray_files(tmp_path, "evil")
    assert not Path("/tmp/evil_abs.png").exists()


def test_zip_symlink_is_refused(tmp_path, fresh_cache):
    z = _zip_with(tmp_path / "bad.zip", "evil_link.png", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
    msg = _failure(_run(tmp_path, fresh_cache, str(z)))
    assert "evil_link.png" in msg and "symbolic link" in msg
    _no_stray_files(tmp_path, "evil")


def _tar_with(path: Path, ti: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("ok.png")
        png = _png()
        ok.size = len(png)
        tf.addfile(ok, io.BytesIO(png))
        ti.size = len(data) if ti.type == tarfile.REGTYPE else 0
        tf.addfile(ti, io.BytesIO(data) if data else None)
    return path


def _ti(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    return ti


@pytest.mark.parametrize("ti,expect", [
    (_ti("../evil_up.png"), "'..'"),
    (_ti("/evil_root.png"), "absolute"),
    (_ti("evil_sym.png", tarfile.SYMTYPE, "/etc/passwd"), "links are not allowed"),
    (_ti("evil_hard.png", tarfile.LNKTYPE, "ok.png"), "links are not allowed"),
    (_ti("evil_dev.png", tarfile.CHRTYPE), "regular files"),
    (_ti("evil_fifo.txt", tarfile.FIFOTYPE), "regular files"),
])
def test_tar_with_unsafe_members_is_refused(tmp_path, fresh_cache, ti, expect):
    name = ti.name
    t = _tar_with(tmp_path / "bad.tar", ti, _png() if ti.type == tarfile.REGTYPE else b"")
    msg = _failure(_run(tmp_path, fresh_cache, str(t)))
    assert name in msg and expect in msg
    _no_stray_files(tmp_path, "evil")


def test_zip_bomb_is_stopped_while_streaming(tmp_path, fresh_cache):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("ok.png", _png())
        zf.writestr("evil_bomb.png", b"\0" * (24 * 2**20))
    assert z.stat().st_size < 100_000
    msg = _failure(_run(tmp_path, fresh_cache, str(z), max_total_bytes=4 * 2**20))
    assert "evil_bomb.png" in msg and "max_total_bytes" in msg and "zip bomb" in msg
    _no_stray_files(tmp_path, "evil")


def test_zip_member_lying_about_its_size_is_refused(tmp_path, fresh_cache):
    """Declared sizes are not trusted: a member bigger than its header says is refused, not truncated."""
    z = tmp_path / "liar.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", _png())
        zf.writestr("evil_liar.txt", b"x" * 50_000)
    raw = bytearray(z.read_bytes())
    size = struct.pack("<I", 50_000)
    for _ in range(2):  # the local header and the central directory both declare the size
        i = raw.index(size, raw.index(b"evil_liar.txt") - 40 if _ == 0 else raw.rindex(b"PK\x01\x02"))
        raw[i:i + 4] = struct.pack("<I", 100)
    z.write_bytes(bytes(raw))
    msg = _failure(_run(tmp_path, fresh_cache, str(z)))
    assert "evil_liar.txt" in msg and "corrupt" in msg


def test_oversized_member_is_refused_by_per_file_cap(tmp_path, fresh_cache):
    z = tmp_path / "big.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("evil_big.txt", b"a" * 70_000)  # captions are capped at 64 KiB
        zf.writestr("ok.png", _png())
    msg = _failure(_run(tmp_path, fresh_cache, str(z)))
    assert "evil_big.txt" in msg and "bytes allowed for one file" in msg


def test_decompression_bomb_image_is_refused(tmp_path, fresh_cache):
    z = _zip_with(tmp_path / "pixels.zip", "evil_pixels.png", _bomb_png())
    msg = _failure(_run(tmp_path, fresh_cache, str(z)))
    assert "evil_pixels.png" in msg and "decompression bomb" in msg and "max_pixels" in msg
    _no_stray_files(tmp_path, "evil")


def test_pixel_cap_is_a_parameter(tmp_path, fresh_cache):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "big.png").write_bytes(_png(size=(64, 64)))
    msg = _failure(_run(tmp_path, fresh_cache, str(folder), max_pixels=1000))
    assert "big.png" in msg and "64x64" in msg


def test_corrupt_image_and_wrong_format_are_named(tmp_path, fresh_cache):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(_png()[:60])
    msg = _failure(_run(tmp_path, fresh_cache, str(folder)))
    assert "broken.png" in msg and "cannot be decoded" in msg
    (folder / "broken.png").write_bytes(b"GIF89a not really")
    (tmp_path / "b").mkdir()
    msg = _failure(_run(tmp_path / "b", fresh_cache, str(folder)))
    assert "broken.png" in msg and "not a PNG, JPEG, WebP or BMP" in msg


def test_limits_on_counts(tmp_path, fresh_cache):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_png())
    msg = _failure(_run(tmp_path, fresh_cache, str(folder), max_images=3))
    assert "max_images = 3" in msg
    (tmp_path / "b").mkdir()
    msg = _failure(_run(tmp_path / "b", fresh_cache, str(folder), max_files=2))
    assert "max_files = 2" in msg


def test_folder_symlink_outside_is_refused_inside_is_taken(tmp_path, fresh_cache):
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png())
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "real.png").write_bytes(_png())
    os.symlink(folder / "real.png", folder / "inside.png")
    res = _run(tmp_path, fresh_cache, str(folder))
    assert res.ok and len(res.outputs["data"]["output"]) == 2
    os.symlink(outside, folder / "evil_out.png")
    (tmp_path / "b").mkdir()
    msg = _failure(_run(tmp_path / "b", tmp_path / "cache2", str(folder)))
    assert "evil_out.png" in msg and "outside the dataset folder" in msg


def test_empty_source_and_non_archive(tmp_path, fresh_cache):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "readme.md").write_text("no images")
    msg = _failure(_run(tmp_path, fresh_cache, str(folder)))
    assert "holds no images" in msg
    junk = tmp_path / "data.bin"
    junk.write_bytes(b"hello")
    (tmp_path / "b").mkdir()
    msg = _failure(_run(tmp_path / "b", fresh_cache, str(junk)))
    assert "not a zip or tar archive" in msg


def test_dataset_is_cached_and_reloaded_from_disk(tmp_path, fresh_cache):
    folder = _good_folder(tmp_path / "imgs")
    first = _run(tmp_path, fresh_cache, str(folder))
    assert first.nodes["data"] == "ran"
    second = _run(tmp_path, fresh_cache, str(folder))
    assert second.nodes["data"] == "cached"
    ds = second.outputs["data"]["output"]
    assert ds.fingerprint == first.outputs["data"]["output"].fingerprint
    assert [it.caption for it in ds.items] == ["a red square", None]
    with Image.open(ds.items[0].path) as im:
        assert im.getpixel((0, 0)) == (250, 0, 0)
