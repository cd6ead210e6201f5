"""``fedtune site keygen | members | pin-members``, ``fedtune provision`` and ``fedtune passport verify``:
the deployment subcommands.

``fedtune.cli`` lists them from :data:`DEPLOYMENT_COMMANDS`. Exit codes: 0 done / passport valid, 1
verification failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.command import Command

if TYPE_CHECKING:
    from common.registry import FederationRegistry
    from fedtune.runtime.kits import Enrolment

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# Each command imports what it uses when it runs: the registry's codecs only in `site` and `provision`,
# fedtune.runtime.kits (X.509, certificates) only in the commands that make keys or kits (tests/test_cli_light.py).

KEYGEN_HELP = """\
Run this at your site, on the machine that will run the site daemon, as the user the daemon runs as.
It makes your site's own private keys; they never leave this directory:
  identity.pem        secure-aggregation identity key (Ed25519)
  supernode.key/.pub  SuperNode authentication key (EC P-384, OpenSSH)
  SITE.enrol.json     your PUBLIC keys: send this file to the coordinator
Then read the two fingerprints it prints to the coordinator's officer over the phone: they must
match what `fedtune provision` shows them. When the coordinator sends your kit (public files:
ca.crt, registry.json, passport-signing.pub, site.json), confirm its members with the other sites'
officers and pin them (`fedtune site members`, `fedtune site pin-members`), then start the daemon with
  fedtune client start --kit KIT --keys DIR ...
Keep DIR backed up and private: lost keys mean enrolling again, leaked keys let others act as you.
"""

MEMBERS_HELP = """\
Lists the members of a registry (each site's name, id and identity-key fingerprint) and the members
digest. Every site's officer runs it on the registry.json of their own kit and confirms, out of band
(by phone, with every other site's officer, not through the coordinator), that the list is the
consortium's and that everyone sees the same digest; then pins it with `fedtune site pin-members`.
"""

PIN_HELP = """\
Pins the federation's members in this site's state directory ({members_file}, owner-only), only if
their digest is the one every site's officer confirmed out of band (`fedtune site members`). The
site then verifies its peers only against this list, never against a registry the coordinator
sends, and refuses any round with a site not on it or bound to another list. Its daemon does not
start without it. A new consortium (a site added or re-keyed) is a new list: confirm and pin again.
"""

PROVISION_HELP = """\
Run on the coordinator's trusted machine, after every site ran `fedtune site keygen` and sent its
SITE.enrol.json. Writes the CA, the SuperLink's TLS certificate, the passport signing key, the
registry of the sites' public identity keys, the coordinator's kit (OUT/server/) and one kit of
public files per site (OUT/sites/SITE/). It never makes or sees a site's private key. Confirm the
fingerprints it prints with each site's officer by phone before handing out any kit.

With --renew OLD it issues new certificates instead, into the new OUT: a new server certificate and
key (signed by OLD/ca/ca.key), and with --new-ca a new CA too (then every site needs its new ca.crt
and site.json). Site keys, the registry (so the members digest the sites pinned) and the passport
keys are copied byte for byte. OUT/README.md says how to roll them out.
"""


def _site_arguments(site: argparse.ArgumentParser) -> None:
    from common.registry import MEMBERS_FILE

    site_actions = site.add_subparsers(dest="site_command", required=True)
    keygen = site_actions.add_parser("keygen", help="make this site's identity and SuperNode keys and its "
                                     "public enrolment file", description=KEYGEN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    keygen.add_argument("--site", required=True, help="this site's name, as agreed with the coordinator, "
                        "e.g. hospital-a")
    keygen.add_argument("--out", type=Path, required=True,
                        help="new directory for the keys (created 0700; never overwritten), e.g. /etc/fedtune/keys")
    members = site_actions.add_parser("members", help="list a registry's members, their fingerprints and the "
                                      "members digest to confirm", description=MEMBERS_HELP,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    members.add_argument("registry", type=Path, help="the registry.json of your kit")
    pin = site_actions.add_parser("pin-members", help="pin the confirmed member list in this site's state",
                                  description=PIN_HELP.format(members_file=MEMBERS_FILE),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    pin.add_argument("--registry", type=Path, required=True, help="the registry.json of your kit")
    pin.add_argument("--state", type=Path, required=True, help="the site's state directory (as `client start --state`)")
    pin.add_argument("--digest", required=True, help="the members digest every site's officer confirmed "
                     "(64 hex digits, spaces allowed)")


def _provision_arguments(prov: argparse.ArgumentParser) -> None:
    source = prov.add_mutually_exclusive_group(required=True)
    source.add_argument("--enrol",
                        help="comma-separated SITE.enrol.json files and/or directories of them (one per site; "
                             "a site's id is its position, a directory's files in name order)")
    source.add_argument("--renew", type=Path, metavar="OLD",
                        help="an earlier provisioning (its --out): issue new certificates for it, same sites and keys")
    prov.add_argument("--server-host",
                      help="comma-separated DNS names / IP addresses the sites use to reach the SuperLink "
                           "(with --enrol; a renewal keeps the hosts)")
    prov.add_argument("--new-ca", action="store_true", help="with --renew: a new CA as well (every site needs its "
                      "new ca.crt and site.json)")
    prov.add_argument("--out", type=Path, required=True, help="new directory for the kits (never overwritten)")
    prov.add_argument("--days", type=int, default=365, help="the server certificate's validity in days (default 365)")
    prov.add_argument("--ca-days", type=int, default=3650,
                      help="a new CA's validity in days (default 3650: renewals keep the CA, and the sites change "
                           "nothing)")


def _passport_arguments(passport: argparse.ArgumentParser) -> None:
    actions = passport.add_subparsers(dest="passport_command", required=True)
    verify = actions.add_parser("verify", help="verify PATH/passport.json against the federation's key")
    verify.add_argument("path", type=Path, help="adapter directory (adapter_model.safetensors, passport.json)")
    verify.add_argument("--key", type=Path, required=True, help="passport-signing.pub from your startup kit")


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",")] if value.strip() else []


def fingerprint_lines(enrolment: Enrolment) -> str:
    return (f"  identity key  (Ed25519)    SHA-256 {enrolment.identity_fingerprint}\n"
            f"  SuperNode key (EC P-384)   SHA-256 {enrolment.supernode_fingerprint}")


def members_lines(members: FederationRegistry) -> str:
    """Each member's name, id and identity-key fingerprint, then the members digest."""
    from common.registry import fingerprint, read_aloud

    lines = [f"  {name!r} (id {sid}): identity key SHA-256 {fingerprint(members.keys[sid].public_bytes_raw())}"
             for sid, name in sorted((sid, name) for name, sid in members.ids.items())]
    return "\n".join([*lines, f"members digest: {read_aloud(members.digest)}"])


def cmd_site(args: argparse.Namespace) -> int:
    """``fedtune site keygen | members | pin-members``."""
    handlers = {"keygen": _cmd_site_keygen, "members": _cmd_site_members, "pin-members": _cmd_site_pin_members}
    from common.registry import RegistryError
    from common.typed import BadInput

    try:
        return handlers[args.site_command](args)
    except (BadInput, RegistryError) as exc:  # a bad key directory (ProvisionError) or registry
        print(f"fedtune site {args.site_command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _cmd_site_keygen(args: argparse.Namespace) -> int:
    """The site's own keys, and the fingerprints to read out."""
    from fedtune.runtime.kits import ENROL_SUFFIX, REGISTRY, site_keygen

    enrolment = site_keygen(args.site, args.out)
    enrol_file = args.out / f"{args.site}{ENROL_SUFFIX}"
    print(f"site {args.site!r}: private keys written to {args.out}/ (owner-only; they never leave this machine)\n"
          f"{fingerprint_lines(enrolment)}\n"
          f"Send {enrol_file} (public keys only) to the coordinator, then read these fingerprints to the\n"
          f"coordinator's officer over the phone. When your kit arrives, confirm its members with every other\n"
          f"site's officer (`fedtune site members KIT/{REGISTRY}`), pin them (`fedtune site pin-members`), and\n"
          f"start the daemon with\n"
          f"  fedtune client start --kit KIT --keys {args.out} --data ... --state ... --superlink HOST:PORT")
    return EXIT_OK


def _cmd_site_members(args: argparse.Namespace) -> int:
    """The registry's members and digest, to confirm out of band."""
    from common.registry import load_registry

    members = load_registry(args.registry)
    print(f"{len(members.ids)} members in {args.registry}:\n{members_lines(members)}\n"
          "Confirm with every other site's officer, by phone and not through the coordinator, that these are the\n"
          "consortium's sites (each reads its own fingerprint) and that all of you see this digest; then pin the\n"
          "digest you CONFIRMED (typed from the call, not copied from here):\n"
          f"  fedtune site pin-members --registry {args.registry} --state STATE --digest 'HEX HEX ...'")
    return EXIT_OK


def _cmd_site_pin_members(args: argparse.Namespace) -> int:
    """Pin the confirmed members in the site's state dir; a digest that differs is refused, nothing written."""
    from common.registry import MEMBERS_FILE, pin_members, read_aloud

    members = pin_members(args.registry, args.state, args.digest)
    print(f"pinned {len(members.ids)} members in {args.state / MEMBERS_FILE} (digest {read_aloud(members.digest)}):\n"
          f"{members_lines(members)}\n"
          "This site takes part only in rounds among these sites, bound to this list.")
    return EXIT_OK


def cmd_provision(args: argparse.Namespace) -> int:
    """``fedtune provision``: read the enrolments, write the kits, show the fingerprints to confirm
    (or, with ``--renew``, new certificates for an earlier provisioning)."""
    if args.renew is not None:
        return _cmd_renew(args)
    if args.server_host is None or args.new_ca:
        print("fedtune provision: --enrol needs --server-host (the SuperLink's DNS names / IP addresses); --new-ca "
              "is for --renew", file=sys.stderr)
        return EXIT_BAD_INPUT
    from common.registry import load_registry, read_aloud
    from fedtune.runtime.kits import REGISTRY, ProvisionError, provision, read_enrolments

    try:
        enrolments = read_enrolments([Path(p) for p in _split(args.enrol)])
        out = provision(enrolments, _split(args.server_host), args.out, days=args.days, ca_days=args.ca_days)
    except ProvisionError as exc:
        print(f"fedtune provision: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"provisioned {len(enrolments)} sites in {out} (certificates valid {args.days} days).\n"
          "CONFIRM each site's fingerprints with its officer by phone before handing out any kit; if one\n"
          f"differs, do not use {out}: delete it, and enrol that site again.")
    for site_id, enrolment in enumerate(enrolments):
        print(f"site {enrolment.site!r} (id {site_id}):\n{fingerprint_lines(enrolment)}")
    print(f"members digest: {read_aloud(load_registry(out / 'server' / REGISTRY).digest)}\n"
          "Every site's officer confirms this digest with the others (`fedtune site members`) and pins it\n"
          "(`fedtune site pin-members`) before the site's daemon starts.")
    print("Hand out:")
    print(f"  {out / 'server'}/  -> the coordinator (runs the SuperLink; register each "
          f"supernode-keys/<site>.pub with `flwr supernode register`)")
    for enrolment in enrolments:
        print(f"  {out / 'sites' / enrolment.site}/  -> site {enrolment.site!r} (public files only; the site "
              "keeps its own keys)")
    print(f"  {out / 'ca' / 'ca.key'}  -> offline storage (only needed to issue new certificates); "
          "it belongs in no kit")
    return EXIT_OK


def _cmd_renew(args: argparse.Namespace) -> int:
    """``fedtune provision --renew OLD``: new certificates into OUT, and who needs which changed file."""
    from fedtune.runtime.kits import KIT_README, ProvisionError, renew

    if args.server_host is not None:
        print("fedtune provision: --renew keeps the server hosts of the certificate it renews; to change them, "
              "provision anew (--enrol)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        changed = renew(args.renew, args.out, days=args.days, new_ca=args.new_ca, ca_days=args.ca_days)
    except ProvisionError as exc:
        print(f"fedtune provision --renew: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out
    print(f"renewed {args.renew} into {out}: {'a new CA and ' if args.new_ca else ''}a new server certificate, "
          f"valid {args.days} days. Site keys, registry.json (members digest unchanged: nothing to pin again), "
          "supernode-keys and passport keys are copied unchanged.\nChanged:")
    for path in changed:
        print(f"  {path}")
    site_files = sorted({Path(p).name for p in changed if p.startswith("sites/")})
    print(f"Hand out (steps in {out / KIT_README}):\n"
          f"  {out / 'server'}/  -> the coordinator: restart `fedtune server start` with it")
    if site_files:
        print(f"  {out / 'sites'}/SITE/{{{','.join(site_files)}}}  -> each site, into its kit (public files; read "
              "the new CA fingerprint, ca_sha256 in site.json, to its officer by phone); sites cannot connect until "
              "they have them, and old kits cannot connect to the new server certificate")
    else:
        print("  the sites: nothing (same CA; their kits are unchanged)")
    print(f"  {out / 'ca' / 'ca.key'}  -> offline storage")
    return EXIT_OK


def cmd_passport(args: argparse.Namespace) -> int:
    """``fedtune passport verify``: 0 valid, 1 verification failed, 2 bad input."""
    handlers = {"verify": _cmd_passport_verify}
    return handlers[args.passport_command](args)


def _cmd_passport_verify(args: argparse.Namespace) -> int:
    from common.passport import PassportError, key_id, load_public_key, verify_passport

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
    from common.privacy_audit import audit_line  # a valid passport's audits only

    unit = passport.get("privacy_unit", "record")
    epsilon = ", ".join(f"{site} {'no DP' if eps is None else f'ε={eps:g} per {unit}'}"
                        for site, eps in sorted(passport["epsilon"].items())) or "none reported"
    own = ", ".join(f"{site} ε={eps:g}" for site, eps in sorted(passport.get("own_noise_epsilon", {}).items()))
    if own:
        epsilon += f" against the coordinator (distributed DP); from each site's own noise alone: {own}"
    audits = "".join(f"  {site}: {audit_line(passport['epsilon'].get(site), released)}\n"
                     for site, released in sorted(passport.get("privacy_audit", {}).items()))
    chosen = passport.get("selection")
    selection = (f"  chosen as the final adapter: {chosen['rule']} {chosen['score']:.3f} over {chosen['evaluations']} "
                 f"evaluation(s); ε is the whole run's\n" if isinstance(chosen, dict) else "")
    print(f"passport OK for {args.path} (signed by key {key_id(public_key)[:16]}…)\n"
          f"  round {passport['server_round']}, {passport['contributors']} contributing sites, {epsilon}\n{audits}"
          f"{selection}"
          f"  base model sha256 {passport['base_model_sha256']}\n"
          f"  adapter sha256    {passport['adapter_sha256']}\n"
          f"  fedtune {passport['fedtune_version']}, created {passport['created']}")
    return EXIT_OK


DEPLOYMENT_COMMANDS = {
    "site": Command("a site's own keys (run at the site)", _site_arguments, cmd_site),
    "provision": Command("create the CA, the server kit and one public kit per enrolled site", _provision_arguments,
                         cmd_provision, description=PROVISION_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter),
    "passport": Command("check a global adapter's signed model passport", _passport_arguments, cmd_passport),
}
"""``fedtune site``, ``provision`` and ``passport``, in the order ``fedtune --help`` lists them."""
