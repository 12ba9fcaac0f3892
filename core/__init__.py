"""CRM Bridge core: every service the console, the server routes, the CLI and the workers call.

`core` never imports streamlit. Services take the acting `Principal` and enforce its tenant scope.
"""
