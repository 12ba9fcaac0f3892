"""SAML single sign-on per tenant, one module per concern (each imports only those listed before it):

- ``common``     purposes of a login, shared views, tenant and configuration lookups
- ``keys``       the SP key pairs (private keys in the vault): ``ensure_sp_keys`` is the explicit step that
                 creates them; rollover; the signed SP metadata
- ``metadata``   IdP metadata: lint, fetch, preview, import, options, status and the posture summary
- ``authn``      what every login shares: cached validation settings, AuthnRequests, decryption settings
- ``testlogin``  test logins, pasted-response checks and their traces
- ``connect``    the connect-link gate: an app user signs in through SSO before a link takes their login
- ``signin``     console sign-in and the ACS every answer returns to
- ``watch``      the certificate watch, the certificate timeline and the purge of expired rows

``sp``, ``lint``, ``parse`` and ``fetch`` hold the SAML work without the database; ``routes`` the HTTP ends.
"""
