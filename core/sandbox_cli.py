"""``crmbridge sandbox serve``: the local CRM sandbox over HTTPS on loopback.

    crmbridge sandbox serve [--host 127.0.0.1] [--port 8502] [--scenario data/demo/sandbox.yaml]
                            [--tls-dir data/sandbox-tls] [--seed N]

Orchestration level (beside core/cli.py): the one core module that starts the sandbox, so no domain
package imports it.
"""

from __future__ import annotations

import argparse


def cmd_sandbox_serve(args: argparse.Namespace) -> int:
    from sandbox.__main__ import serve

    serve(args.host, args.port, args.scenario, args.tls_dir, seed=args.seed, log_level=args.log_level)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from sandbox.__main__ import DEFAULT_SCENARIO, DEFAULT_TLS_DIR

    sandbox = subparsers.add_parser("sandbox", help="the local CRM sandbox").add_subparsers(
        dest="sandbox_command", required=True)
    serve = sandbox.add_parser("serve", help="serve the CRM sandbox over HTTPS on loopback")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8502)
    serve.add_argument("--scenario", default=str(DEFAULT_SCENARIO))
    serve.add_argument("--tls-dir", default=str(DEFAULT_TLS_DIR))
    serve.add_argument("--seed", type=int, default=None)
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=cmd_sandbox_serve)
