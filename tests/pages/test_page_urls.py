"""Streamlit infers a page's URL from its file name with leading digits and underscores removed, and
refuses to start when two files in pages/ resolve to the same URL — so shared page pieces (_x.py) must
not share a name with a page (found by the browser journey: _accounts.py vs accounts.py)."""

from __future__ import annotations

import re
from collections import Counter

from tests.conftest import ROOT


def test_no_two_page_files_resolve_to_the_same_url():
    names = [re.sub(r"^[0-9_\s-]+", "", p.stem).lower() for p in (ROOT / "pages").glob("*.py")]
    dupes = [n for n, k in Counter(names).items() if k > 1]
    assert not dupes, f"pages/ files resolve to the same URL: {dupes}"
