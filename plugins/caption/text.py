"""The exact rules that turn a generated caption into the final caption text.

1. ``compose_generated(raw, prefix, suffix)`` — only for captions the model wrote
   (like Replicate's ``autocaption_prefix`` / ``_suffix``).  Each of prefix,
   raw caption and suffix is stripped of surrounding whitespace; the non-empty
   ones are joined with one space, except that a suffix starting with
   punctuation (``, . ; : ! ?``) is attached without a space.
   ``"a photo of TOK,"`` + ``"a cat"`` + ``", 4k"`` -> ``"a photo of TOK, a cat, 4k"``.
2. ``apply_trigger(caption, trigger, placement)`` — for every caption the node
   outputs except files the user edited.  ``[trigger]`` placeholders are
   replaced by the trigger word first.  Then, unless the trigger word already
   appears as a whole word, ``placement="prefix"`` gives ``"TOK, <caption>"``,
   ``"suffix"`` gives ``"<caption>, TOK"`` (the caption's trailing ``.`` /
   ``,`` and spaces are dropped first), ``"none"`` adds nothing.  An empty
   caption becomes just ``"TOK"`` (prefix/suffix placement).
3. ``clean_caption(text)`` — for captions read from files (a dataset's ``.txt``
   files, caption files the user edited): terminal escape sequences,
   bidirectional overrides and control characters (NUL included) are removed;
   the caller logs what was removed.
"""

from __future__ import annotations

import re

PLACEHOLDER = "[trigger]"
_PUNCT = tuple(",.;:!?")


def compose_generated(raw: str, prefix: str = "", suffix: str = "") -> str:
    """prefix + generated caption + suffix, joined by the rules in the module docstring."""
    text = " ".join(p for p in (prefix.strip(), raw.strip()) if p)
    tail = suffix.strip()
    if not tail:
        return text
    if not text:
        return tail.lstrip(",;: ") if tail.startswith(_PUNCT) else tail
    return text + tail if tail.startswith(_PUNCT) else f"{text} {tail}"


def has_word(text: str, word: str) -> bool:
    """True if ``word`` appears in ``text`` as a whole word (case-sensitive)."""
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


def apply_trigger(caption: str, trigger: str | None, placement: str) -> str:
    """Substitute ``[trigger]`` and place the trigger word by the rules in the module docstring."""
    if not trigger or not trigger.strip():
        return caption
    trigger = trigger.strip()
    caption = caption.replace(PLACEHOLDER, trigger).strip()
    if placement == "none" or has_word(caption, trigger):
        return caption
    if not caption:
        return trigger
    if placement == "prefix":
        return f"{trigger}, {caption}"
    return f"{caption.rstrip(' .,')}, {trigger}"


_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_caption(text: str) -> tuple[str, list[str]]:
    """``text`` without terminal escape sequences, bidirectional overrides and control characters (NUL
    included); also which kinds were removed (for the log)."""
    removed = []
    for label, pattern in (("ANSI escape sequences", _ANSI), ("bidirectional overrides", _BIDI),
                           ("control characters (NUL and others)", _CONTROL)):
        text, n = pattern.subn("", text)
        if n:
            removed.append(f"{n} {label}")
    return text, removed
