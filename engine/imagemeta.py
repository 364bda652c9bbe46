"""Image provenance: embed fluxkiln's metadata in an image file and read it back.

One JSON object (the *payload*) describes how an image was made: the recipe
TOML text, the ``--set`` overrides, the producing node with its parameters, the
seed, the prompt, the model and the fluxkiln version.  It is stored

* in PNG as an iTXt chunk with keyword ``fluxkiln`` (zlib-compressed when large),
* in JPEG and WebP inside an XMP packet, as the element ``fluxkiln:payload``
  (XML-escaped JSON) or ``fluxkiln:payload_zb64`` (base64 of zlib-compressed
  JSON) when the packet would not fit in one JPEG APP1 segment.

Secrets are never embedded: :func:`sanitize` redacts values of token-like keys
(``hf_token``, ``wandb_api_key`` ...), token-shaped strings and the values of
secret-looking environment variables.  Metadata read from a file is untrusted:
:func:`read_metadata` caps sizes and only accepts a JSON object.

Pure Pillow (imported lazily); no torch.
"""

from __future__ import annotations

import base64
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, BinaryIO
from xml.sax.saxutils import escape, unescape

KEY = "fluxkiln"
FORMAT = "fluxkiln.image/1"
XMP_NS = "https://fluxkiln.dev/ns/image/1.0/"
MAX_PAYLOAD = 512 * 1024  # bytes of JSON we embed or accept when reading
JPEG_XMP_LIMIT = 65000  # one APP1 segment holds 65533 bytes, less the XMP header
REDACTED = "<redacted>"
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

SECRET_KEY = re.compile(r"(?:^|[_.-])(?:token|api[_-]?key|secret|password|passwd|credentials?)(?:$|[_.-])",
                        re.IGNORECASE)
SECRET_ENV_NAME = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
ENV_REF = re.compile(r"^\$[A-Za-z_][A-Za-z0-9_]*$")
TOKEN_VALUE = re.compile(r"\b(?:hf_|sk-|ghp_|gho_|github_pat_|r8_|xox[abp]-)[A-Za-z0-9_\-]{16,}")
TOML_STRING_VALUE = re.compile(
    r"""(?P<key>[A-Za-z0-9_.-]+|"[^"\n]*"|'[^'\n]*')(?P<eq>[ \t]*=[ \t]*)(?P<val>"(?:[^"\\\n]|\\.)*"|'[^'\n]*')""")
_PAYLOAD_RE = re.compile(rb"<fluxkiln:payload>(.*?)</fluxkiln:payload>", re.DOTALL)
_PAYLOAD_Z_RE = re.compile(rb"<fluxkiln:payload_zb64>([A-Za-z0-9+/=\s]*)</fluxkiln:payload_zb64>")


class MetadataError(ValueError):
    """An image holds fluxkiln metadata that cannot be read (corrupt, too large, not an object)."""


def fluxkiln_version() -> str:
    """The installed fluxkiln version, or ``"unknown"``."""
    from importlib import metadata

    try:
        return metadata.version("fluxkiln")
    except metadata.PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------ secrets
def _env_secrets() -> list[str]:
    """Values of environment variables whose names look secret (long enough to be tokens)."""
    vals = {v for k, v in os.environ.items()
            if SECRET_ENV_NAME.search(k) and len(v) >= 10 and not any(c.isspace() for c in v)}
    return sorted(vals, key=len, reverse=True)


def _scrub_text(text: str, env_values: list[str]) -> str:
    for v in env_values:
        if v in text:
            text = text.replace(v, REDACTED)
    return TOKEN_VALUE.sub(REDACTED, text)


def redact_toml(text: str, env_values: list[str] | None = None) -> str:
    """Redact literal values of token-like keys in TOML text; ``"$ENV"`` references are kept."""
    def one(m: re.Match) -> str:
        key, val = m.group("key").strip("\"'"), m.group("val")[1:-1]
        if not SECRET_KEY.search(key.rsplit(".", 1)[-1]) or ENV_REF.match(val) or val == "":
            return m.group(0)
        return f'{m.group("key")}{m.group("eq")}"{REDACTED}"'

    env_values = _env_secrets() if env_values is None else env_values
    return _scrub_text(TOML_STRING_VALUE.sub(one, text), env_values)


def _redact_override(item: str, env_values: list[str]) -> str:
    key, sep, value = item.partition("=")
    if sep and SECRET_KEY.search(key.rsplit(".", 1)[-1]) and not ENV_REF.match(value.strip().strip("\"'")):
        return f"{key}={REDACTED}"
    return _scrub_text(item, env_values)


def sanitize(value: Any, env_values: list[str] | None = None, _key: str = "") -> Any:
    """Return a JSON-safe copy of ``value`` with every secret redacted (see module doc)."""
    env_values = _env_secrets() if env_values is None else env_values
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k = str(k)
            if k == "recipe" and isinstance(v, str):
                out[k] = redact_toml(v, env_values)
            elif k == "overrides" and isinstance(v, list):
                out[k] = [_redact_override(str(x), env_values) for x in v]
            else:
                out[k] = sanitize(v, env_values, k)
        return out
    if isinstance(value, (list, tuple)):
        return [sanitize(v, env_values, _key) for v in value]
    if isinstance(value, str):
        if _key and SECRET_KEY.search(_key) and value and not ENV_REF.match(value):
            return REDACTED
        return _scrub_text(value, env_values)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if _key and SECRET_KEY.search(_key):
        return REDACTED
    return _scrub_text(str(value), env_values)


# ------------------------------------------------------------------ payload
def build_payload(*, recipe_text: str | None = None, recipe_name: str | None = None,
                  recipe_file: str | None = None, overrides: list[str] | None = None,
                  node: str | None = None, node_type: str | None = None, params: dict[str, Any] | None = None,
                  seed: int | None = None, prompt: str | None = None, model: str | None = None,
                  index: int | None = None, flags: dict[str, Any] | None = None,
                  saved_by: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble (and sanitize) the metadata payload for one image."""
    payload: dict[str, Any] = {
        "format": FORMAT, "fluxkiln_version": fluxkiln_version(),
        "recipe_name": recipe_name, "recipe_file": recipe_file, "recipe": recipe_text,
        "overrides": list(overrides or []), "node": node, "node_type": node_type,
        "params": dict(params or {}), "model": model, "seed": seed, "prompt": prompt,
        "index": index, "flags": dict(flags or {}), "saved_by": saved_by,
    }
    payload.update(extra or {})
    return sanitize({k: v for k, v in payload.items() if v is not None})


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=True, sort_keys=False, separators=(",", ":"))


def _fit(payload: dict[str, Any], limit: int) -> tuple[dict[str, Any], str]:
    """Shrink a payload that is too large: drop the recipe text, then params and prompt."""
    text = _dumps(payload)
    for drop in ("recipe", "params", "prompt"):
        if len(text) <= limit:
            break
        if drop in payload:
            payload = {k: v for k, v in payload.items() if k != drop}
            payload.setdefault("omitted", []).append(drop)
            text = _dumps(payload)
    if len(text) > limit:
        raise MetadataError(f"image metadata is {len(text)} bytes, more than the {limit} allowed")
    return payload, text


# ------------------------------------------------------------------ writing
def xmp_packet(payload: dict[str, Any], *, limit: int | None = None) -> bytes:
    """An XMP packet holding the payload; compressed (and shrunk) to fit ``limit`` bytes if given."""
    payload, text = _fit(dict(payload), MAX_PAYLOAD)
    tool = escape(f"fluxkiln {payload.get('fluxkiln_version', '')}".strip())

    def packet(body: str) -> bytes:
        return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
                '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
                ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
                '  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
                f' xmlns:fluxkiln="{XMP_NS}">\n'
                f'   <xmp:CreatorTool>{tool}</xmp:CreatorTool>\n'
                f'   {body}\n'
                '  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n'
                '<?xpacket end="w"?>').encode("utf-8")

    data = packet(f"<fluxkiln:payload>{escape(text)}</fluxkiln:payload>")
    if limit is None or len(data) <= limit:
        return data
    for _ in range(4):
        z = base64.b64encode(zlib.compress(text.encode("ascii"), 9)).decode("ascii")
        data = packet(f"<fluxkiln:payload_zb64>{z}</fluxkiln:payload_zb64>")
        if len(data) <= limit:
            return data
        payload, text = _fit(payload, max(1024, len(text) // 2))
    raise MetadataError(f"cannot fit image metadata into {limit} bytes")


def save_kwargs(fmt: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``PIL.Image.save`` that embed ``payload`` in format ``fmt`` (png/jpg/webp)."""
    pil = FORMATS.get(fmt.lower())
    if pil is None:
        raise ValueError(f"unsupported image format {fmt!r}; use png, jpg or webp")
    if pil == "PNG":
        from PIL.PngImagePlugin import PngInfo

        _, text = _fit(dict(payload), MAX_PAYLOAD)
        info = PngInfo()
        info.add_text("Software", f"fluxkiln {payload.get('fluxkiln_version', '')}".strip())
        info.add_itxt(KEY, text, zip=len(text) > 2048)
        return {"pnginfo": info}
    return {"xmp": xmp_packet(payload, limit=JPEG_XMP_LIMIT if pil == "JPEG" else None)}


def write_image(image: Any, fp: str | Path | BinaryIO, fmt: str, payload: dict[str, Any] | None,
                quality: int = 80) -> None:
    """Encode a PIL image as png/jpg/webp to ``fp`` with the payload embedded (``quality`` ignored for png)."""
    pil = FORMATS.get(fmt.lower())
    if pil is None:
        raise ValueError(f"unsupported image format {fmt!r}; use png, jpg or webp")
    kwargs = save_kwargs(fmt, payload) if payload else {}
    im = image
    if pil == "JPEG" and im.mode not in ("RGB", "L", "CMYK"):
        im = im.convert("RGB")
    elif pil == "WEBP" and im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.getbands() or im.mode == "P" else "RGB")
    if pil == "JPEG":
        kwargs.update(quality=int(quality), optimize=True)
    elif pil == "WEBP":
        kwargs.update(quality=int(quality), method=4)
    else:
        kwargs.update(compress_level=6)
    im.save(fp, format=pil, **kwargs)


# ------------------------------------------------------------------ reading
def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_PAYLOAD + 1)
    except zlib.error as exc:
        raise MetadataError(f"compressed fluxkiln metadata is corrupt: {exc}") from exc
    if len(out) > MAX_PAYLOAD or d.unconsumed_tail:
        raise MetadataError(f"fluxkiln metadata is larger than {MAX_PAYLOAD} bytes; refusing to read it")
    return out


def _from_xmp(xmp: bytes | str) -> str | None:
    raw = xmp.encode("utf-8", "replace") if isinstance(xmp, str) else bytes(xmp)
    m = _PAYLOAD_RE.search(raw)
    if m:
        if len(m.group(1)) > MAX_PAYLOAD * 2:
            raise MetadataError("fluxkiln metadata is too large; refusing to read it")
        return unescape(m.group(1).decode("utf-8", "replace"), {"&quot;": '"', "&apos;": "'"})
    m = _PAYLOAD_Z_RE.search(raw)
    if m:
        try:
            data = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except ValueError as exc:
            raise MetadataError(f"fluxkiln metadata is not valid base64: {exc}") from exc
        return _inflate(data).decode("utf-8", "replace")
    return None


def parse_payload(text: str) -> dict[str, Any]:
    """Decode a payload's JSON text; raise :class:`MetadataError` unless it is a fluxkiln object."""
    if len(text) > MAX_PAYLOAD:
        raise MetadataError(f"fluxkiln metadata is larger than {MAX_PAYLOAD} bytes; refusing to read it")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MetadataError(f"fluxkiln metadata is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MetadataError("fluxkiln metadata is not a JSON object")
    if not str(data.get("format", "")).startswith("fluxkiln."):
        raise MetadataError("fluxkiln metadata has no 'format' field naming a fluxkiln format")
    return data


def read_raw(path: str | Path) -> tuple[str | None, str]:
    """Return (payload JSON text or None, Pillow format name) for an image file."""
    from PIL import Image

    with Image.open(path, formats=("PNG", "JPEG", "WEBP")) as im:
        fmt = im.format or ""
        if fmt == "PNG":
            text = im.info.get(KEY)
            return (str(text) if text is not None else None), fmt
        xmp = im.info.get("xmp")
        return (_from_xmp(xmp) if xmp else None), fmt


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The fluxkiln payload embedded in a png/jpg/webp file, or ``None`` if it has none.

    Raises :class:`MetadataError` for a payload that is present but unreadable,
    and Pillow's ``UnidentifiedImageError`` / ``OSError`` for a file that is not
    a png, jpg or webp image.
    """
    text, _ = read_raw(path)
    return None if text is None else parse_payload(text)
