"""A real English text corpus available offline: The Jargon File, from Debian's ``jargon-text`` package.

Source: The Jargon File, version 4.4.7 (29 Dec 2003), edited by Eric S. Raymond: twelve chapters of essay
prose on hacker slang and culture, a lexicon of about 2,300 entries written as prose definitions with
examples, and appendices (folklore, a portrait of J. Random Hacker, a bibliography). About 1.7 MB of text,
roughly 400k SmolLM2 tokens. License: public domain ("This document (the Jargon File) is in the public
domain, to be freely used, shared, and modified": /usr/share/doc/jargon-text/copyright); Debian packaging
GPL-2. It ships as ``/usr/share/doc/jargon-text/jargon.txt.gz`` in the Debian package ``jargon-text``
(4.4.7-4.1 in bookworm).

Where the text comes from, in order: the installed package (``apt-get install jargon-text``); a copy
already extracted into ``~/.cache/casp/corpus``; else ``apt-get download jargon-text`` and ``dpkg-deb -x``
into that cache (no root needed). Nothing in casp is tuned on this text; the benchmarks calibrate on the
calibration split and measure on the disjoint test split.

    text = load_corpus("jargon")
    split = split_corpus(text)          # CorpusSplit(calibration=..., test=...), disjoint paragraphs
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from casp.errors import CaspError

DEFAULT_CACHE = Path("~/.cache/casp/corpus")


@dataclasses.dataclass(frozen=True)
class CorpusSource:
    """Where a corpus lives inside a Debian package, and what it is."""

    name: str
    package: str  # Debian package
    member: str  # path of the (gzipped) text inside the package
    title: str
    license: str


CORPORA: dict[str, CorpusSource] = {
    "jargon": CorpusSource(
        name="jargon",
        package="jargon-text",
        member="usr/share/doc/jargon-text/jargon.txt.gz",
        title="The Jargon File 4.4.7 (29 Dec 2003), ed. Eric S. Raymond; Debian package jargon-text 4.4.7-4.1",
        license="public domain (the Jargon File's own statement; Debian packaging GPL-2)",
    ),
}


@dataclasses.dataclass(frozen=True)
class CorpusSplit:
    """A corpus cut into a calibration part and a held-out test part with no paragraph in common."""

    calibration: str
    test: str


def corpus_source(name: str) -> CorpusSource:
    if name not in CORPORA:
        raise CaspError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    return CORPORA[name]


def locate_corpus_file(name: str = "jargon", cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Path of the raw (gzipped) text: installed package, cached extraction, or a fresh ``apt-get download``."""
    source = corpus_source(name)
    installed = Path("/") / source.member
    if installed.is_file():
        return installed
    cache = Path(cache_dir).expanduser()
    cached = cache / source.package / source.member
    if cached.is_file():
        return cached
    hint = (
        f"install it with `apt-get install {source.package}` (Debian/Ubuntu), or put the package's "
        f"{source.member} under {cache / source.package}"
    )
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CaspError(f"corpus {name!r} needs the Debian package {source.package}; {hint}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        done = subprocess.run(
            ["apt-get", "download", source.package], cwd=tmp, capture_output=True, text=True, timeout=600
        )
        debs = sorted(Path(tmp).glob(f"{source.package}_*.deb"))
        if done.returncode != 0 or not debs:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CaspError(f"apt-get download {source.package} failed ({last[0]}); {hint}")
        target = Path(tmp) / "extract"
        done = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], capture_output=True, text=True)
        if done.returncode != 0 or not (target / source.member).is_file():
            raise CaspError(f"could not extract {source.member} from {debs[0].name}; {hint}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        (target / source.member).replace(cached)
    return cached


def load_corpus(name: str = "jargon", cache_dir: str | Path = DEFAULT_CACHE) -> str:
    """The cleaned text of a corpus (see the module docstring for source and license).

    Cleaning: no-break spaces become spaces; the title page and table of contents are dropped (the text
    starts at "Chapter 1."); lines are unwrapped into paragraphs; cross-reference braces ``{word}`` become
    ``word``; a lexicon entry's headword line (``:term: n.``) is joined to its definition; paragraphs of
    fewer than five words (lists of headwords, section titles) or with under 60% letters among their
    non-space characters (a page of digits, ASCII art) are dropped; repeated paragraphs are kept once.
    Paragraphs are separated by a blank line.
    """
    path = locate_corpus_file(name, cache_dir)
    raw = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text("utf-8")
    return clean_text(raw)


HEADWORD = re.compile(r"^:[^:]+:")  # a lexicon entry's first line, e.g. ":gobble: vt."


def clean_text(raw: str, min_words: int = 5) -> str:
    """Unwrapped, de-duplicated paragraphs of ``raw`` (rules in ``load_corpus``)."""
    raw = raw.replace("\u00a0", " ")  # the text uses no-break spaces in headings ("Chapter\u00a01.")
    start = raw.find("\nChapter 1.")
    body = raw[start + 1 :] if start >= 0 else raw
    paragraphs, seen, pending = [], set(), ""
    for block in re.split(r"\n\s*\n", body):
        text = " ".join(line.strip() for line in block.splitlines() if line.strip())
        text = re.sub(r"\{([^{}]*)\}", r"\1", text)
        if not text:
            continue
        if HEADWORD.match(text):
            pending = text  # joined to the definition that follows
            continue
        if pending:
            text, pending = f"{pending} {text}", ""
        if len(text.split()) < min_words or text in seen or not _mostly_letters(text):
            continue
        seen.add(text)
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _mostly_letters(text: str) -> bool:
    # Drops a few pages of digits (the lexicon prints a long number in full) and ASCII-art tables.
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) >= 0.6 * len(chars)


def split_corpus(text: str, test_every: int = 5, block: int = 40) -> CorpusSplit:
    """Cut ``text`` into consecutive blocks of ``block`` paragraphs; every ``test_every``-th block is test.

    Both parts then cover every region of the text (essays, lexicon, appendices), and each test block is
    long contiguous prose for sliding-window perplexity. Paragraphs are unique (``clean_text``), so the
    parts share none.
    """
    if test_every < 2 or block < 1:
        raise ValueError(f"split_corpus: test_every must be >= 2 and block >= 1, got {test_every}, {block}")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    if len(paragraphs) < test_every * block:
        raise CaspError(f"corpus too short to split: {len(paragraphs)} paragraphs, need {test_every * block}")
    calibration, test = [], []
    for i in range(0, len(paragraphs), block):
        part = test if (i // block) % test_every == test_every - 1 else calibration
        part.extend(paragraphs[i : i + block])
    return CorpusSplit(calibration="\n\n".join(calibration), test="\n\n".join(test))
