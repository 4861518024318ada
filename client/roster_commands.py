"""``fedmm site roster-key`` and ``fedmm site roster ...``: the roster ceremony's commands.

Active-coordinator mode (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, section 6: a PKI the server does not
control) needs every site's round keys signed under a key the coordinator never holds, and
a list of those keys that every site signed. The steps (docs/site-guide.md):

1. ``roster-key FILE``: the site's Ed25519 roster signing key (0600, never the SuperNode
   key); prints the public key and its fingerprint, to send to whoever collects the roster.
2. ``roster create FILE --federation NAME`` and ``roster add FILE --name N --key HEX``:
   anyone (the coordinator's operator, a site) collects the list; collecting needs no trust.
3. ``roster show FILE``: federation, digest, each site's fingerprint and whether it signed;
   the operators compare it over a second channel (phone, video call), not via the
   coordinator.
4. ``roster sign FILE --key KEYFILE``: the site signs the exact list.
   ``roster merge OUT COPY...`` joins copies that sites signed separately.
5. ``roster verify FILE [--digest HEX]``: every listed site signed; with ``--digest``, the
   roster is the one pinned. Then the site pins the printed digest
   (``[secure-aggregation] roster-digest`` in its site config).

The coordinator distributes the file but cannot forge it: a changed list has a new digest,
and every signature and every site's pin is over the old one. The logic is
``common.secagg.roster`` and ``client.secagg.site_signing_key``/``site_identity``; these
functions print, and raise ``ValueError`` (exit 2) on anything the user must fix.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_roster_parsers(steps: Any) -> None:
    """The ``roster-key`` and ``roster`` steps of ``fedmm site`` (its subparsers)."""
    key = steps.add_parser(
        "roster-key",
        help="create the site's roster signing key (Ed25519, 0600) for active-coordinator mode",
        description="A new Ed25519 key in FILE (mode 0600; its folder 0700 if made). It is "
        "not the SuperNode authentication key. Prints the public key and its fingerprint: "
        "send both to whoever collects the roster.",
    )
    key.add_argument("file", type=Path, metavar="FILE")
    key.add_argument("--show", action="store_true", help="print an existing key's public half")
    key.set_defaults(handler=_roster_key)
    roster = steps.add_parser(
        "roster",
        help="the federation roster: create, add, show, sign, merge, verify",
        description="The roster ceremony of active-coordinator mode (docs/site-guide.md).",
    )
    actions = roster.add_subparsers(dest="roster_step", required=True)
    create = actions.add_parser("create", help="a new, empty roster file")
    create.add_argument("file", type=Path, metavar="FILE")
    create.add_argument("--federation", required=True, help="the federation's name")
    create.set_defaults(handler=_create)
    add = actions.add_parser("add", help="add a site (drops every signature: sign again)")
    add.add_argument("file", type=Path, metavar="FILE")
    add.add_argument("--name", required=True, help="the site's name (letters, digits, . _ -)")
    add.add_argument("--key", required=True, metavar="HEX", help="its public key (64 hex digits)")
    add.set_defaults(handler=_add)
    show = actions.add_parser("show", help="digest and fingerprints, to compare out of band")
    show.add_argument("file", type=Path, metavar="FILE")
    show.set_defaults(handler=_show)
    sign = actions.add_parser("sign", help="sign the roster with this site's roster key")
    sign.add_argument("file", type=Path, metavar="FILE")
    sign.add_argument("--key", required=True, type=Path, metavar="KEYFILE")
    sign.set_defaults(handler=_sign)
    merge = actions.add_parser("merge", help="join copies of one roster signed separately")
    merge.add_argument("out", type=Path, metavar="OUT")
    merge.add_argument("copies", type=Path, nargs="+", metavar="COPY")
    merge.set_defaults(handler=_merge)
    verify = actions.add_parser(
        "verify", help="check every site signed (and, with --digest, that it is pinned)"
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--digest", metavar="HEX", help="the digest this site pinned")
    verify.add_argument(
        "--key", type=Path, metavar="KEYFILE", help="also check this site's key is listed"
    )
    verify.set_defaults(handler=_verify)


def _roster_key(args: argparse.Namespace) -> int:
    from fedmm.client.secagg.site_signing_key import (
        create_site_signing_key,
        describe_site_public_key,
    )

    if not args.show:
        create_site_signing_key(args.file)
        print(f"roster signing key {args.file} (0600: never leaves this site)")
    print(describe_site_public_key(args.file), end="")
    print("send the signing key and fingerprint to whoever collects the roster; compare the")
    print("fingerprint with them over a second channel (phone, video call)")
    return 0


def _create(args: argparse.Namespace) -> int:
    from fedmm.common.secagg.roster import RosterError, create_roster, save_roster

    if args.file.exists():
        raise RosterError(f"{args.file} already exists: add sites to it, or choose a new file")
    save_roster(create_roster(args.federation), args.file)
    print(f"roster of {args.federation!r} in {args.file}: add each site's public key")
    return 0


def _add(args: argparse.Namespace) -> int:
    from fedmm.common.secagg.roster import RosterError, add_site, load_roster, save_roster

    try:
        public = bytes.fromhex("".join(args.key.split()))
    except ValueError:
        raise RosterError(f"--key {args.key!r} is not hex: use the 64 hex digits") from None
    roster = load_roster(args.file)
    dropped = len(roster.signatures)
    roster = add_site(roster, name=args.name, signing_key=public)
    save_roster(roster, args.file)
    print(
        f"added {args.name} to {args.file}" + (f"; {dropped} signature(s) dropped" * bool(dropped))
    )
    return _print_roster(args.file)


def _show(args: argparse.Namespace) -> int:
    return _print_roster(args.file)


def _sign(args: argparse.Namespace) -> int:
    from fedmm.client.secagg.site_identity import sign_roster_file

    sign_roster_file(roster_file=args.file, signing_key_file=args.key)
    print(f"signed {args.file}; sign only after comparing every fingerprint out of band")
    return _print_roster(args.file)


def _merge(args: argparse.Namespace) -> int:
    from fedmm.common.secagg.roster import load_roster, merge_signatures, save_roster

    merged = merge_signatures([load_roster(path) for path in args.copies])
    save_roster(merged, args.out)
    print(f"merged {len(args.copies)} copies into {args.out}")
    return _print_roster(args.out)


def _verify(args: argparse.Namespace) -> int:
    from fedmm.client.secagg.site_identity import SiteIdentity
    from fedmm.client.secagg.site_signing_key import load_site_signing_key
    from fedmm.common.secagg.roster import format_digest, load_roster, parse_digest, verify_roster

    pinned = None if args.digest is None else parse_digest(args.digest, source="--digest")
    verified = verify_roster(load_roster(args.file), pinned_digest=pinned)
    print(f"{args.file}: every one of its {verified.size} sites signed it")
    if args.key is not None:
        identity = SiteIdentity.from_key(
            signing_key=load_site_signing_key(args.key), roster=verified
        )
        print(f"this site's key is listed as {identity.name}")
    print("pin it in the site config, [secure-aggregation]:")
    print(f'roster-digest = "{format_digest(verified.digest)}"')
    return 0


def _print_roster(path: Path) -> int:
    from fedmm.common.secagg.roster import describe_roster, load_roster

    print(describe_roster(load_roster(path)), end="")
    return 0
