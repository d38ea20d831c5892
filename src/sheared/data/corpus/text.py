"""Pure text functions of the sample corpus: decoding, cleaning, HTML to text, and splitting
manuals, FAQs, the Bible and novels into one piece per document.

Every function here takes strings (or bytes) and returns strings; none reads a file or runs a
program, so each is tested on hand-made inputs.
"""

from __future__ import annotations

import html.parser
import re
from collections.abc import Sequence

DICTD_BASE64_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # dictd's b64
DICTD_META_PREFIXES = ("00-database-", "00database")  # dictfmt's own header entries, not content

BIBLE_CHAPTER_HEADING = re.compile(r"^(?P<book>\S.*) (?P<chapter>\d+)$")  # "1 Samuel 3", "Genesis 1"
AUSTEN_HEADING = re.compile(r"^\s*(chapter|volume)\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)

POD_QUESTION = re.compile(r"^=head2\s+(?P<title>.+?)\s*$")
POD_SECTION_END = re.compile(r"^=(head[12]|cut)\b")
RST_ADORNMENT = re.compile(r"^([=\-~^*+#\"'`:._])\1{2,}\s*$")  # a title under/overline, >= 3 chars
ASCIIDOC_ANCHOR = re.compile(r"^\[\[(?P<id>[^\]]+)\]\]\s*$")  # gitfaq marks each question with one
INFO_NODE_SEPARATOR = "\x1f"  # Texinfo's node separator in `.info` files
INFO_NODE_NAME = re.compile(r"\bNode:\s*(?P<name>[^,\n]+)")
INFO_SKIP_PREFIXES = ("Tag Table:", "End Tag Table", "Local Variables:")
HTML_SECTION_OPEN = re.compile(r'<div class="section"')  # DocBook's chunked HTML (Debian FAQ)

# html_to_text: elements whose content is not text, and elements that start a new paragraph / line.
HTML_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "head", "title", "svg"})
HTML_PARAGRAPH_TAGS = frozenset(
    {
        "p", "div", "section", "article", "aside", "header", "footer", "nav", "main", "form",
        "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre",
        "hr", "figure", "figcaption", "center", "fieldset", "address", "details", "summary",
    }
)  # fmt: skip
HTML_LINE_TAGS = frozenset({"li", "dt", "dd", "tr", "caption", "option"})
HTML_CELL_TAGS = frozenset({"td", "th"})


def decode_dictd_number(digits: str) -> int:
    """Decodes an offset or length from a dictd `.index` file.

    dictd writes numbers in base 64, most significant digit first, with the digits
    A–Z a–z 0–9 + / standing for 0–63 (not RFC 4648 base64: there is no padding or byte grouping).

    Args:
        digits: The field, e.g. "Tt3u".

    Returns:
        The number, e.g. 5168622.

    Raises:
        ValueError: If a character is not a dictd base-64 digit.
    """
    value = 0
    for char in digits:
        digit = DICTD_BASE64_DIGITS.find(char)
        if digit < 0:
            raise ValueError(f"not a dictd base-64 digit: {char!r} in {digits!r}")
        value = value * len(DICTD_BASE64_DIGITS) + digit
    return value


def parse_dictd_index(index_text: str) -> list[tuple[str, int, int]]:
    """Parses a dictd `.index` file into (headword, offset, length), skipping dictfmt's own entries.

    Entries that share one definition (aliases) are kept once, under their first headword.
    """
    entries = []
    seen_spans: set[tuple[int, int]] = set()
    for line in index_text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith(DICTD_META_PREFIXES):
            continue
        span = (decode_dictd_number(fields[1]), decode_dictd_number(fields[2]))
        if span in seen_spans:
            continue
        seen_spans.add(span)
        entries.append((fields[0], *span))
    return entries


def decode_text(raw: bytes) -> str:
    """Decodes file bytes as UTF-8, falling back to Latin-1 (old TeX and Gutenberg files)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean_text(text: str) -> str:
    """Normalizes one document: no byte-order mark, Unix newlines, no surrounding blank space."""
    return text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n").strip()


class _HTMLTextExtractor(html.parser.HTMLParser):
    """Collects the visible text of an HTML page with paragraph breaks (see `html_to_text`)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._pending_newlines = 0  # line breaks owed before the next text
        self._skip_depth = 0  # inside <script>, <style>, <head> ...
        self._pre_depth = 0  # inside <pre>: whitespace is kept as is
        self._pre_started = False  # no text yet since the last <pre>

    def text(self) -> str:
        """Returns the text collected so far."""
        return "".join(self._parts).strip()

    def _break(self, newlines: int) -> None:
        self._pending_newlines = max(self._pending_newlines, newlines)

    def _emit(self, text: str) -> None:
        if self._pending_newlines and self._parts:
            self._parts[-1] = self._parts[-1].rstrip(" ")
            self._parts.append("\n" * self._pending_newlines)
        self._pending_newlines = 0
        self._parts.append(text)

    def _after_space(self) -> bool:
        return not self._parts or self._pending_newlines > 0 or self._parts[-1].endswith(("\n", " "))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self._skip_depth = 0  # an unclosed <head> ends where <body> starts
        elif tag in HTML_SKIP_TAGS:
            self._skip_depth += 1
        elif tag in HTML_PARAGRAPH_TAGS:
            self._break(2)
        elif tag == "br":
            # Two <br> in a row make a blank line, one makes a line break.
            self._pending_newlines = min(self._pending_newlines + 1, 2)
        elif tag in HTML_LINE_TAGS:
            self._break(1)
        elif tag in HTML_CELL_TAGS and not self._after_space():
            self._emit(" ")
        if tag == "pre":
            self._pre_depth += 1
            self._pre_started = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in HTML_SKIP_TAGS:  # <svg/> and friends have no content to skip
            self.handle_starttag(tag, attrs)
        if tag == "pre":
            self._pre_depth -= 1

    def handle_endtag(self, tag: str) -> None:
        if tag in HTML_SKIP_TAGS:
            self._skip_depth = max(self._skip_depth - 1, 0)
        elif tag in HTML_PARAGRAPH_TAGS:
            self._break(2)
        elif tag in HTML_LINE_TAGS:
            self._break(1)
        if tag == "pre":
            self._pre_depth = max(self._pre_depth - 1, 0)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._pre_depth:
            if self._pre_started and data.startswith("\n"):
                data = data[1:]  # a newline right after <pre> is not content (HTML spec)
            self._pre_started = False
            if data:
                self._emit(data)
            return
        text = re.sub(r"\s+", " ", data)
        if self._after_space():
            text = text.lstrip(" ")
        if text:
            self._emit(text)


def html_to_text(page: str) -> str:
    """Converts an HTML page to plain text with the stdlib parser.

    Scripts, styles and the `<head>` are dropped; paragraphs and headings are separated by a blank
    line, list items and `<br>` start a new line, whitespace is collapsed except inside `<pre>`.
    Character references (`&amp;`, `&#8212;`) are decoded.

    Args:
        page: The HTML source.

    Returns:
        The visible text, stripped.
    """
    extractor = _HTMLTextExtractor()
    extractor.feed(page)
    extractor.close()
    return re.sub(r"\n{3,}", "\n\n", extractor.text())


def split_pod_faq(pod: str) -> list[tuple[str, str]]:
    """Splits a perlfaq POD file into one (question, text) pair per `=head2` question.

    A question runs until the next `=head1` / `=head2` / `=cut`. The text is the question, a blank
    line, then the POD body of the answer.
    """
    questions = []
    title: str | None = None
    body: list[str] = []

    def flush() -> None:
        if title is not None:
            questions.append((title, f"{title}\n\n" + "\n".join(body).strip()))

    for line in pod.splitlines():
        heading = POD_QUESTION.match(line)
        if heading or POD_SECTION_END.match(line):
            flush()
            title, body = (heading["title"], []) if heading else (None, [])
        elif title is not None:
            body.append(line)
    flush()
    return questions


def _rst_title_lines(lines: Sequence[str]) -> list[int]:
    """Returns the indices of the reST section title lines (each is followed by its underline).

    A title is a non-indented line underlined by one punctuation character repeated at least as
    long as the title, preceded by a blank line, the start of the file, or a matching overline.
    """
    titles = []
    for index in range(len(lines) - 1):
        title, underline = lines[index].rstrip(), lines[index + 1].rstrip()
        if not title or title[0].isspace() or RST_ADORNMENT.match(title) or len(underline) < len(title):
            continue
        if not RST_ADORNMENT.match(underline):
            continue
        above = lines[index - 1].rstrip() if index else ""
        if above and above != underline:
            continue
        titles.append(index)
    return titles


def split_rst_sections(text: str) -> list[tuple[str, str]]:
    """Splits a reStructuredText document into one (title, text) pair per section.

    Used for Python's FAQ sources, where every question is a section title. The text of a section is
    its title, a blank line, and its body up to the next title of any level; overlines and
    underlines are dropped. Text before the first title is dropped.
    """
    lines = text.splitlines()
    starts = _rst_title_lines(lines)
    sections = []
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(lines)
        body = lines[start + 2 : end]
        if number + 1 < len(starts) and end > 0 and RST_ADORNMENT.match(lines[end - 1].rstrip()):
            body = body[:-1]  # the next title's overline
        title = lines[start].strip()
        text = "\n".join(body).strip()
        sections.append((title, f"{title}\n\n{text}" if text else title))
    return sections


def split_asciidoc_faq(text: str) -> list[tuple[str, str]]:
    """Splits gitfaq's AsciiDoc into one (question, text) pair per `[[anchor]]`-marked question.

    A question runs until the next anchor or section title. Its first line (`Question?::`) becomes
    the question; the text is the question, a blank line and the answer.
    """
    lines = text.splitlines()
    stops = set(_rst_title_lines(lines)) | {i for i, line in enumerate(lines) if ASCIIDOC_ANCHOR.match(line)}
    questions = []
    for start in sorted(i for i in stops if ASCIIDOC_ANCHOR.match(lines[i])):
        end = min((i for i in stops if i > start), default=len(lines))
        body = lines[start + 1 : end]
        if not body:
            continue
        question = body[0].strip().removesuffix("::").strip()
        answer = "\n".join(line.removeprefix("\t") for line in body[1:]).strip()
        questions.append((question, f"{question}\n\n{answer}"))
    return questions


def split_info_nodes(info: str) -> list[tuple[str, str]]:
    """Splits a Texinfo `.info` file into one (node name, text) pair per node.

    The file's preamble, the tag table and the `File: ..., Node: ...` header lines are dropped.
    """
    nodes = []
    for chunk in info.split(INFO_NODE_SEPARATOR)[1:]:
        chunk = chunk.lstrip("\n")
        if chunk.startswith(INFO_SKIP_PREFIXES):
            continue
        header, _, body = chunk.partition("\n")
        name = INFO_NODE_NAME.search(header)
        if name:
            nodes.append((name["name"].strip(), body.strip()))
    return nodes


def split_html_sections(page: str) -> list[tuple[str, str]]:
    """Splits DocBook chunked HTML at each `<div class="section">` into (title, text) pairs.

    Used for the Debian FAQ, one chapter per page and one section per question. The part before the
    first section (navigation, table of contents) is dropped; the title is the first text line.
    """
    starts = [match.start() for match in HTML_SECTION_OPEN.finditer(page)]
    sections = []
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(page)
        text = html_to_text(page[start:end])
        if text:
            sections.append((text.split("\n", 1)[0].strip(), text))
    return sections


def split_bible_books(text: str) -> list[tuple[str, str]]:
    """Splits the `bible` program's pretty-printed output into one (book, text) pair per book.

    The program prints "Genesis 1" between blank lines before each chapter; verses start with an
    indented number, and their wrapped lines never stand alone between blank lines.
    """
    lines = text.splitlines()
    books: list[tuple[str, list[str]]] = []
    for index, line in enumerate(lines):
        alone = (index == 0 or not lines[index - 1].strip()) and (
            index + 1 == len(lines) or not lines[index + 1].strip()
        )
        heading = BIBLE_CHAPTER_HEADING.match(line) if alone else None
        if heading and (not books or books[-1][0] != heading["book"]):
            books.append((heading["book"], []))
        if books:
            books[-1][1].append(line)
    return [(book, "\n".join(body).strip()) for book, body in books]


def split_novel_chapters(lines: Sequence[str]) -> list[tuple[str, str]]:
    """Splits a novel (one string per line) at its CHAPTER / VOLUME headings into (heading, text).

    The front matter before the first heading is its own piece, titled "front matter".
    """
    chapters: list[tuple[str, list[str]]] = [("front matter", [])]
    for line in lines:
        if AUSTEN_HEADING.match(line):
            chapters.append((line.strip(), []))
        chapters[-1][1].append(line)
    return [(heading, "\n".join(body).strip()) for heading, body in chapters]
