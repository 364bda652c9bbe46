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
