"""The demo model's corpus: Debian's fortune cookie files, cleaned and split deterministically.

Owns: finding the installed fortune files (Debian packages ``fortunes`` and ``fortunes-min``),
turning each file into one text record per cookie (the files separate cookies with a line holding
only ``%``), resolving the old terminal "overstrike" underlining (``____\\b\\b\\b\\bword``), and the
held-out split. Leaves tokenization and training to ``train_demo.py``.

The split is by cookie, decided by a hash of the cookie's text (crc32), so it does not depend on
file order, Python's hash seed or the number of files: a cookie is held out when
``crc32(text) % 1000 < heldout_permille``.

Provenance and licence: the files are installed from Debian's ``main`` archive; their copyright
file (``/usr/share/doc/fortunes/copyright``) states the BSD licence of fortune(6) by The Regents
of the University of California. The cookies are quotations attributed inline to their authors.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
COPYRIGHT_FILE = Path("/usr/share/doc/fortunes/copyright")
DEBIAN_PACKAGES = ("fortunes", "fortunes-min")
# ASCII pictures are not English text; everything else in the two packages is used.
EXCLUDED_FILES = frozenset({"ascii-art"})

INSTALL_HINT = (
    "The demo corpus is Debian's fortune cookie files, expected under {dir}. "
    "Install them with:  sudo apt-get update && sudo apt-get install fortunes  "
    "(the package 'fortunes' pulls in 'fortunes-min'), then run this script again."
)


@dataclass(frozen=True)
class Corpus:
    """Cookies split into training and held-out records, plus where they came from."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    files: tuple[str, ...]  # the fortune files read, in sorted order
    source_dir: Path


def resolve_overstrike(text: str) -> str:
    """Apply backspaces the way a terminal would: each ``\\b`` erases the character before it.

    The fortune files underline words as ``____\\b\\b\\b\\bword``; the visible result is ``word``.
    """
    out: list[str] = []
    for ch in text:
        if ch == "\b":
            if out and out[-1] != "\n":
                out.pop()
        else:
            out.append(ch)
    return "".join(out)


def clean_cookie(raw: str) -> str:
    """One cookie as plain text: overstrike resolved, other control characters dropped."""
    text = resolve_overstrike(raw)
    text = "".join(ch for ch in text if ch in "\n\t" or ord(ch) >= 32 and ord(ch) != 127)
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def split_cookies(file_text: str) -> list[str]:
    """Cut one fortune file into cookies at lines that hold only ``%``."""
    cookies, cur = [], []
    for line in file_text.split("\n"):
        if line.strip() == "%":
            cookies.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    cookies.append("\n".join(cur))
    return [c for c in (clean_cookie(c) for c in cookies) if c.strip()]


def is_heldout(text: str, heldout_permille: int) -> bool:
    return zlib.crc32(text.encode("utf-8")) % 1000 < heldout_permille


def fortune_files(source_dir: Path = FORTUNE_DIR) -> list[Path]:
    """The cookie files in ``source_dir`` (not the ``.dat`` indexes or ``.u8`` symlinks)."""
    if not source_dir.is_dir():
        raise SystemExit(INSTALL_HINT.format(dir=source_dir))
    files = sorted(
        p
        for p in source_dir.iterdir()
        if p.is_file() and not p.is_symlink() and "." not in p.name and p.name not in EXCLUDED_FILES
    )
    if not files:
        raise SystemExit(INSTALL_HINT.format(dir=source_dir))
    return files


def load_corpus(source_dir: Path = FORTUNE_DIR, heldout_permille: int = 50) -> Corpus:
    """Read every fortune file, deduplicate cookies, and split them (default 5% held out)."""
    files = fortune_files(source_dir)
    seen: set[str] = set()
    train: list[str] = []
    heldout: list[str] = []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for cookie in split_cookies(text):
            if cookie in seen:  # a few cookies appear in more than one file
                continue
            seen.add(cookie)
            (heldout if is_heldout(cookie, heldout_permille) else train).append(cookie)
    return Corpus(tuple(train), tuple(heldout), tuple(p.name for p in files), source_dir)


def write_cookies(cookies: tuple[str, ...] | list[str], path: Path) -> None:
    """Cookies in the fortune file format (separated by lines holding only ``%``), which
    ``split_cookies`` reads back unchanged."""
    path.write_text("\n%\n".join(cookies) + "\n", encoding="utf-8")


HELDOUT_SAMPLE = 120  # held-out cookies shipped as tests/data/demo-heldout.txt


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="summarize the demo corpus")
    ap.add_argument("--source-dir", type=Path, default=FORTUNE_DIR)
    ap.add_argument("--write-heldout", type=Path, metavar="FILE",
                    help=f"write the first {HELDOUT_SAMPLE} held-out cookies to FILE (the test "
                    "data of the q4/q8 quality test)")  # fmt: skip
    a = ap.parse_args()
    c = load_corpus(a.source_dir)
    n_train = sum(len(t) for t in c.train)
    n_held = sum(len(t) for t in c.heldout)
    print(f"{len(c.files)} files from {c.source_dir}")
    print(f"train:   {len(c.train)} cookies, {n_train} characters")
    print(f"heldout: {len(c.heldout)} cookies, {n_held} characters")
    if a.write_heldout:
        write_cookies(c.heldout[:HELDOUT_SAMPLE], a.write_heldout)
        print(f"wrote the first {HELDOUT_SAMPLE} held-out cookies to {a.write_heldout}")
