"""Console accounts: invitations, password reset, TOTP multi-factor authentication, disabling, and
the account lists for tenant admins and staff. Every change is audited."""
