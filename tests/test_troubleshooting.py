"""The messages quoted in docs/guide/troubleshooting.md still occur in the package.

Each bullet of the page starts with one or more messages in backquotes, then ``: `` and what to
do; the parts that depend on the call are
written ``…``. Every other piece of the message must occur in the package's source, with string
literals joined across lines (``f"... "`` + newline + ``f"..."``), so that a reworded or removed
message shows up here and the page is updated with it.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "guide" / "troubleshooting.md"


def _package_text():
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "extra_attrib").rglob("*.py"))
    # adjacent string literals: "abc "\n    f"def" -> "abc def"
    text = re.sub(r"([\"'])\s*\n\s*(?:[rfb]{0,2})([\"'])", "", text)
    return re.sub(r"\s+", " ", text)


def _quoted_messages():
    text = PAGE.read_text(encoding="utf-8")
    bullets = re.findall(r"^- (`.*?)(?=^- |^#|^\S|\Z)", text, re.S | re.M)
    messages = []
    for bullet in bullets:
        bullet = re.sub(r"\s+", " ", bullet)
        end = re.search(r"`[:.](?: |$)", bullet)  # the explanation follows the message(s)
        head = bullet[: end.start() + 1] if end else bullet
        messages.extend(re.findall(r"`([^`]+)`", head))
    return messages


def test_the_page_quotes_many_messages():
    assert len(_quoted_messages()) >= 60


def test_every_quoted_message_occurs_in_the_package():
    source = _package_text()
    missing = []
    for message in _quoted_messages():
        for piece in message.split("…"):
            piece = piece.strip(" .:,")
            if len(piece) >= 6 and piece not in source:
                missing.append((message, piece))
    assert not missing, "\n".join(f"{m!r}: {p!r} not found" for m, p in missing)
