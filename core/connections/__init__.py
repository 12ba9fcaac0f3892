"""CRM accounts in use: adding them from the catalog, their credentials (through the vault), connection
tests, the API-quota gauge, OAuth sign-ins and connect links.

Sits above ``core.providers`` (pure adapters: catalog + class, given a transport and credentials) and
``core.vault``; nothing below imports it.
"""
