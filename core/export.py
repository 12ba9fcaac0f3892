"""CSV export shared by every table the console lets a user download.

Each cell is neutralised against spreadsheet formula injection (OWASP "CSV Injection"): a cell a
spreadsheet would evaluate — starting with ``= + - @`` or a tab/carriage return — is prefixed with ``'``
so it is shown as text. Tenant-supplied strings (labels, names, e-mail addresses, IdP values) end up in
these files, so no table is exported without it."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    s = "" if value is None else str(value)
    return "'" + s if s.startswith(FORMULA_START) else s


def to_csv(rows: Iterable[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """Rows (dicts, as the pages hand to st.dataframe) as CSV text with a header row."""
    rows = list(rows)
    cols = list(columns) if columns is not None else (list(rows[0].keys()) if rows else [])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([csv_cell(c) for c in cols])
    for r in rows:
        w.writerow([csv_cell(r.get(c)) for c in cols])
    return buf.getvalue()
