"""Safe XML parsing. Every SAML document from outside (metadata upload or URL, SAMLResponse) passes
through here before lxml, xmlsec or python3-saml builds anything from it.

Two walls, in order:
1. a byte scan that refuses any document declaring a DTD or an entity (``<!DOCTYPE``, ``<!ENTITY``)
   before a parser sees it, so no entity is ever expanded (billion laughs) and no external DTD is
   fetched (XXE/SSRF);
2. lxml with ``resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False``, and a
   check of the parsed document's docinfo (a DTD that slipped past the scan is still refused).

Raises ``InvalidInput`` with a ``code`` the callers turn into lint findings or trace checks.
"""

from __future__ import annotations

import re
import threading

from lxml import etree

from core.errors import InvalidInput

MAX_XML_BYTES = 5 * 1024 * 1024

_DTD_RE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class _ParserTLS(threading.local):
    parser: etree.XMLParser | None = None


_tls = _ParserTLS()


def _parser() -> etree.XMLParser:
    # lxml parsers are not thread-safe: one per thread.
    if _tls.parser is None:
        _tls.parser = etree.XMLParser(
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            huge_tree=False,
            remove_comments=False,  # exc-c14n#WithComments signatures need them (SWAMID)
            remove_pis=False,
        )
    return _tls.parser


def _scan_text(data: bytes) -> bytes:
    """The document as ASCII-compatible bytes for the DTD scan (UTF-16 decoded)."""
    head = data[:4]
    if head.startswith(_UTF16_BOMS):
        try:
            return data.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                "The XML document is not valid UTF-16.", fix="Save it as UTF-8.", code="xml_encoding"
            ) from exc
    if b"\x00" in head:
        raise InvalidInput(
            "The XML document uses an encoding CRM Bridge does not read (UTF-32 or UTF-16 without a BOM).",
            fix="Save it as UTF-8.",
            code="xml_encoding",
        )
    return data


def refuse_dtd(data: bytes) -> None:
    """Refuse a document that declares a DTD or an entity, before any parser expands anything."""
    if _DTD_RE.search(_scan_text(data)):
        raise InvalidInput(
            "The document declares a DTD (<!DOCTYPE> or <!ENTITY>): refused before parsing, no entity "
            "was expanded and nothing was fetched.",
            fix="SAML metadata and responses never need a DTD: export the file again from the IdP "
            "(this one may be malicious).",
            code="dtd_forbidden",
        )


def parse_xml(data: bytes | str, *, max_bytes: int = MAX_XML_BYTES) -> etree._Element:
    """Parse untrusted XML safely and return its root element.

    Raises:
        InvalidInput: empty, too large, DTD/entity declarations, unsupported encoding, not well-formed.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not data or not data.strip():
        raise InvalidInput("The document is empty.", fix="Upload the IdP's metadata XML file.", code="empty")
    if len(data) > max_bytes:
        raise InvalidInput(
            f"The document is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB.",
            fix="Upload only your IdP's own metadata, not a whole federation bundle.",
            code="too_large",
        )
    refuse_dtd(data)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise InvalidInput(
            f"The document is not well-formed XML: {exc.msg}.",
            fix="Download the file again without editing it; check that nothing (a comment, a blank "
            "line, a byte-order mark) precedes the <?xml ...?> declaration.",
            code="not_well_formed",
        ) from exc
    if root is None:
        raise InvalidInput("The document has no root element.", fix="Upload an XML file.", code="empty")
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise InvalidInput(
            "The document declares a DTD: refused.", fix="Export the file again from the IdP.",
            code="dtd_forbidden",
        )
    return root
