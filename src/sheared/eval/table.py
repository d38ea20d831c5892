"""Plain-text tables for the terminal: every column as wide as its widest cell, header included, so
that no model name, domain or header is cut."""

from __future__ import annotations

from collections.abc import Collection, Sequence

COLUMN_GAP = "  "


def text_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[int] = (), rule: bool = False
) -> list[str]:
    """The lines of a table (no trailing spaces).

    Args:
        header: the column titles.
        rows: the cells, already formatted, one sequence per row, as many as `header`.
        right: indices of the right-aligned columns (numbers); the others are left-aligned.
        rule: a line of dashes under the header.
    """
    assert all(len(row) == len(header) for row in rows), "every row has a cell per column"
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return COLUMN_GAP.join(padded).rstrip()

    dashes = [COLUMN_GAP.join("-" * w for w in widths)] if rule else []
    return [line(header), *dashes, *(line(row) for row in rows)]
