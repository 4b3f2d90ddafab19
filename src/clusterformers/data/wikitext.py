"""MediaWiki XML dumps as plain-text articles: stream parsing and wikitext cleaning.

Wikitext cleaning keeps the running text and drops everything else: comments, ``<ref>``s, ``<math>`` and
other non-prose tags, ``{{templates}}`` (balanced, nested), ``{| tables |}``, ``[[File:…]]`` /
``[[Image:…]]`` / ``[[Category:…]]`` and interlanguage links, bold/italic quotes and list markers. Links keep
their label (``[[a|b]]`` → ``b``, ``[[a]]`` → ``a``), external links keep their label, entities are
unescaped. Section headings keep their text on a line of its own (``== History ==`` → ``History``).
"""

from __future__ import annotations

import bz2
import functools
import gzip
import html
import logging
import re
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import BinaryIO

from clusterformers.data.sources import WIKI, resolve_data_path

logger = logging.getLogger(__name__)

__all__ = ["clean_wikitext", "load_wikipedia", "open_text_source"]

# ----------------------------------------------------------------------------- wikitext cleaning

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_DROP_TAGS = "ref|references|math|chem|ce|gallery|timeline|score|syntaxhighlight|source|pre|hiero|imagemap|graph"
_SELF_CLOSING = re.compile(rf"<(?:{_DROP_TAGS})\b[^<>]*?/>", re.I)
_DROP_BLOCK = re.compile(rf"<({_DROP_TAGS})\b[^<>]*>.*?</\1\s*>", re.I | re.S)
_BRACES = re.compile(r"\{\{|\}\}")
_TABLE_OPEN = re.compile(r"^\s*:*\s*\{\|")
_TABLE_CLOSE = re.compile(r"^\s*\|\}")
_EXTERNAL = re.compile(r"\[(?:https?://|ftp://|//)[^\s\]]*\s*([^\]]*)\]")
_BRACKETS = re.compile(r"\[\[|\]\]")
_DROP_NAMESPACES = frozenset({"file", "image", "category", "media"})
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$|^simple$")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^[ \t]*=+[ \t]*(.*?)[ \t]*=+[ \t]*$", re.M)
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*?/?>")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+[ \t]*", re.M)
_RULE = re.compile(r"^-{4,}[ \t]*", re.M)
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f\u3000]+")
_PAREN_LEAD = re.compile(r"\([ \t]*(?:[,;:][ \t]*)*")
_PAREN_TRAIL = re.compile(r"(?:[ \t]*[,;:])*[ \t]*\)")
_EMPTY_PARENS = re.compile(r"\([ \t]*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"(?<=\S) +(?=[,.;:](?:\s|\Z))")
_REDIRECT = re.compile(r"^\s*#redirect", re.I)


def _remove_templates(text: str) -> str:
    """Remove balanced, possibly nested ``{{…}}`` spans (``}}}}`` closes two).

    A stray ``}}`` is dropped; an unclosed ``{{`` is dropped while the text after it is kept (and cleaned).
    """
    out: list[str] = []
    while True:
        pos, depth, outer_end = 0, 0, 0
        for match in _BRACES.finditer(text):
            if match.group().startswith("{"):
                if depth == 0:
                    out.append(text[pos : match.start()])
                    outer_end = match.end()
                depth += 1
            elif depth > 0:
                depth -= 1
            else:
                out.append(text[pos : match.start()])
            if depth == 0:
                pos = match.end()
        if depth == 0:
            out.append(text[pos:])
            return "".join(out)
        text = text[outer_end:]


def _remove_tables(text: str) -> str:
    """Drop the lines of (possibly nested) ``{| … |}`` tables; both markers count only at a line start."""
    kept: list[str] = []
    depth = 0
    for line in text.split("\n"):
        if _TABLE_OPEN.match(line):
            depth += 1
        elif depth > 0 and _TABLE_CLOSE.match(line):
            depth -= 1
        elif depth == 0:
            kept.append(line)
    return "\n".join(kept)


def _render_link(inner: str) -> str:
    """Visible text of an internal link ``[[inner]]``; files, categories and interlanguage links vanish."""
    parts = inner.split("|")
    target = parts[0].strip()
    if target.startswith(":"):
        target = target[1:].strip()
    elif ":" in target:
        namespace = target.split(":", 1)[0].strip().lower()
        if namespace in _DROP_NAMESPACES or (len(parts) == 1 and _INTERLANGUAGE.match(namespace)):
            return ""
    label = parts[-1].strip() if len(parts) > 1 else target
    return label or target


def _replace_links(text: str) -> str:
    """Replace nested ``[[…]]`` links from the inside out by their visible text (``_render_link``)."""
    frames: list[list[str]] = [[]]
    pos = 0
    for match in _BRACKETS.finditer(text):
        frames[-1].append(text[pos : match.start()])
        pos = match.end()
        if match.group() == "[[":
            frames.append([])
        elif len(frames) > 1:
            inner = "".join(frames.pop())
            frames[-1].append(_render_link(inner))
    frames[-1].append(text[pos:])
    while len(frames) > 1:  # unclosed "[[": keep its text, drop the brackets
        inner = "".join(frames.pop())
        frames[-1].append(inner)
    return "".join(frames[0])


def _tidy(text: str) -> str:
    """Collapse spaces and remove what removed templates leave behind: ``( ; x, )`` → ``(x)``, ``()``, `` ,``;
    strip lines and drop empty ones."""
    text = _SPACES.sub(" ", text)
    text = _PAREN_LEAD.sub("(", text)
    text = _PAREN_TRAIL.sub(")", text)
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub("", text)
    return "\n".join(stripped for line in text.split("\n") if (stripped := line.strip()))


def clean_wikitext(text: str) -> str:
    """Plain text of a wikitext article (see the module docstring for what is kept).

    Headings keep their text on a line of their own; blank lines are removed, so the result is a block of
    non-empty lines (no blank line inside an article).
    """
    text = _COMMENT.sub("", text)
    text = html.unescape(text)
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _DROP_BLOCK.sub("", text)
    text = _remove_templates(text)
    text = _remove_tables(text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _replace_links(text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _BR.sub("\n", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = _LIST_MARK.sub("", text)
    text = _RULE.sub("", text)
    return _tidy(text)


# ----------------------------------------------------------------------------- XML dumps


def _local(tag: str) -> str:
    """Tag name without the XML namespace (MediaWiki dumps use ``{http://www.mediawiki.org/xml/...}``)."""
    return tag.rsplit("}", 1)[-1]


def open_text_source(path: Path) -> BinaryIO:
    """Binary handle of a plain, ``.bz2`` or ``.gz`` file."""
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


@functools.lru_cache(maxsize=4)
def _parse_wikipedia(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """Stream-parse a MediaWiki XML dump into cleaned articles; cached on path, mtime and size."""
    try:
        articles, skipped = _parse_pages(path)
    except ET.ParseError as err:
        raise ValueError(f"{path!r} is not a well-formed MediaWiki XML dump ({err})") from err
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path!r} cannot be read ({type(err).__name__}: {err})") from err
    if not articles:
        raise ValueError(f"{path!r} contains no article pages (<page> with <text>) after cleaning")
    logger.info("parsed %d articles from %s (%d redirects/namespaced/empty skipped)", len(articles), path, skipped)
    return tuple(articles)


def _parse_pages(path: str) -> tuple[list[str], int]:
    """The cleaned articles of a dump and the number of pages skipped."""
    articles: list[str] = []
    skipped = 0
    with open_text_source(Path(path)) as handle:
        context = ET.iterparse(handle, events=("start", "end"))
        _, root = next(context)
        for event, elem in context:
            if event != "end" or _local(elem.tag) != "page":
                continue
            title, body, redirect = "", "", False
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    body = child.text or ""
            if redirect or ":" in title or _REDIRECT.match(body):
                skipped += 1
            else:
                cleaned = clean_wikitext(body)
                if cleaned:
                    articles.append(cleaned)
                else:
                    skipped += 1
            root.clear()
    return articles, skipped


def load_wikipedia(path: str | Path | None = None) -> list[str]:
    """Articles of a MediaWiki XML dump (``.xml``, ``.xml.bz2`` or ``.xml.gz``) as plain text.

    Args:
        path: the dump; ``None`` = the 6 MB English Wikipedia sample shipped in ``gensim`` (~100 articles).

    Returns:
        One string per article, markup stripped by ``clean_wikitext``; redirects, pages whose title holds
        ``:`` (other namespaces) and pages that clean to nothing are skipped. Parsed once per file and cached.
    """
    resolved = resolve_data_path(path, WIKI).resolve()
    stat = resolved.stat()
    return list(_parse_wikipedia(str(resolved), stat.st_mtime_ns, stat.st_size))
