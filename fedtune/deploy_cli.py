"""``fedtune provision`` and ``fedtune passport verify``: the deployment subcommands.

``fedtune.cli`` adds them with :func:`add_subcommands` and calls the handler it returns for the
chosen command. Exit codes: 0 done / passport valid, 1 verification failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from common.passport import PassportError, key_id, load_public_key, verify_passport
from common.kits import MAX_DAYS, ProvisionError, provision

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def add_subcommands(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``provision`` and ``passport`` to ``sub``; returns command name → handler (exit code)."""
    prov = sub.add_parser("provision", help="create the CA, the server kit and one startup kit per site",
                          description="Create a federation's CA, TLS certificate, SuperNode auth keys, "
                                      "identity keys and passport signing key, as one kit per party.")
    prov.add_argument("--sites", required=True, help="comma-separated site names, e.g. hospital-a,hospital-b")
    prov.add_argument("--server-host", required=True,
                      help="comma-separated DNS names / IP addresses the sites use to reach the SuperLink")
    prov.add_argument("--out", type=Path, required=True, help="new directory for the kits (never overwritten)")
    prov.add_argument("--days", type=int, default=365, help=f"certificate validity, 1..{MAX_DAYS} (default 365)")
    passport = sub.add_parser("passport", help="check a global adapter's signed model passport")
    actions = passport.add_subparsers(dest="passport_command", required=True)
    verify = actions.add_parser("verify", help="verify PATH/passport.json against the federation's key")
    verify.add_argument("path", type=Path, help="adapter directory (adapter_model.safetensors, passport.json)")
    verify.add_argument("--key", type=Path, required=True, help="passport-signing.pub from your startup kit")
    return {"provision": cmd_provision, "passport": cmd_passport}


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",")] if value.strip() else []


def cmd_provision(args: argparse.Namespace) -> int:
    """``fedtune provision``: write the kits, then say which directory goes to whom."""
    sites = _split(args.sites)
    try:
        out = provision(sites, _split(args.server_host), args.out, days=args.days)
    except ProvisionError as exc:
        print(f"fedtune provision: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"provisioned {len(sites)} sites in {out} (certificates valid {args.days} days). Hand out:")
    print(f"  {out / 'server'}/  -> the coordinator (runs the SuperLink; register each "
          f"supernode-keys/<site>.pub with `flwr supernode register`)")
    for name in sites:
        print(f"  {out / 'sites' / name}/  -> site {name!r} only, over a secure channel")
    print(f"  {out / 'ca' / 'ca.key'}  -> offline storage (only needed to issue new certificates); "
          "it belongs in no kit")
    return EXIT_OK


def cmd_passport(args: argparse.Namespace) -> int:
    """``fedtune passport verify``: 0 valid, 1 verification failed, 2 bad input."""
    handlers = {"verify": _cmd_passport_verify}
    return handlers[args.passport_command](args)


def _cmd_passport_verify(args: argparse.Namespace) -> int:
    if not args.path.is_dir():
        print(f"fedtune passport verify: {args.path} is not a directory; give the adapter directory",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        public_key = load_public_key(args.key)
    except PassportError as exc:
        print(f"fedtune passport verify: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        passport = verify_passport(args.path, public_key)
    except PassportError as exc:
        print(f"PASSPORT INVALID for {args.path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    epsilon = ", ".join(f"{site} {'no DP' if eps is None else f'ε={eps:g}'}"
                        for site, eps in sorted(passport["epsilon"].items())) or "none reported"
    print(f"passport OK for {args.path} (signed by key {key_id(public_key)[:16]}…)\n"
          f"  round {passport['server_round']}, {passport['contributors']} contributing sites, {epsilon}\n"
          f"  base model sha256 {passport['base_model_sha256']}\n"
          f"  adapter sha256    {passport['adapter_sha256']}\n"
          f"  fedtune {passport['fedtune_version']}, created {passport['created']}")
    return EXIT_OK
