"""The federation roster: a list no party can change without every listed site signing it.

Real Ed25519 keys; every bad input must raise ``RosterError`` with a message that names what
is wrong and what to do.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmm.common.secagg.roster import (
    Roster,
    RosterError,
    add_site,
    create_roster,
    describe_roster,
    fingerprint,
    format_digest,
    load_roster,
    merge_signatures,
    parse_digest,
    roster_fingerprints,
    save_roster,
    sign_roster,
    verify_roster,
)


def _key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _signed(names: list[str]) -> tuple[Roster, dict[str, Ed25519PrivateKey]]:
    keys = {name: _key() for name in names}
    roster = create_roster("hospitals")
    for name in names:
        roster = add_site(roster, name=name, signing_key=_public(keys[name]))
    for name in names:
        roster = sign_roster(roster, private_key=keys[name])
    return roster, keys


def test_a_roster_every_site_signed_verifies_and_pins_its_digest() -> None:
    roster, _ = _signed(["clinic-b", "clinic-a", "clinic-c"])
    assert roster.names == ("clinic-a", "clinic-b", "clinic-c")  # sorted, whatever the order
    verified = verify_roster(roster, pinned_digest=roster.digest)
    assert verified.size == 3 and verified.digest == roster.digest
    assert "clinic-b" in verified and "clinic-z" not in verified


def test_the_digest_covers_names_and_keys_but_not_signatures() -> None:
    roster, keys = _signed(["a", "b"])
    unsigned = Roster(federation=roster.federation, sites=roster.sites)
    assert unsigned.digest == roster.digest
    other_key = add_site(create_roster("hospitals"), name="a", signing_key=_public(_key()))
    other_key = add_site(other_key, name="b", signing_key=_public(keys["b"]))
    assert other_key.digest != roster.digest
    renamed = add_site(create_roster("hospitals"), name="a2", signing_key=_public(keys["a"]))
    renamed = add_site(renamed, name="b", signing_key=_public(keys["b"]))
    assert renamed.digest != roster.digest
    other_federation = Roster(federation="banks", sites=roster.sites)
    assert other_federation.digest != roster.digest


def test_a_site_that_has_not_signed_is_named() -> None:
    keys = {name: _key() for name in ("a", "b", "c")}
    roster = create_roster("hospitals")
    for name, key in keys.items():
        roster = add_site(roster, name=name, signing_key=_public(key))
    roster = sign_roster(roster, private_key=keys["a"])
    with pytest.raises(RosterError, match=r"site 'b' has not signed; site 'c' has not signed"):
        verify_roster(roster)


def test_adding_a_site_drops_the_signatures_so_everyone_signs_again() -> None:
    roster, _ = _signed(["a", "b"])
    grown = add_site(roster, name="intruder", signing_key=_public(_key()))
    assert grown.signatures == {}
    with pytest.raises(RosterError, match="has not signed"):
        verify_roster(grown)


def test_an_unknown_site_slipped_into_a_signed_roster_is_refused() -> None:
    """Someone (the coordinator, say) adds its own site to the file and signs for it: the
    other sites' signatures no longer match the list."""
    roster, _ = _signed(["a", "b", "c"])
    intruder = _key()
    forged = Roster(
        federation=roster.federation,
        sites=add_site(roster, name="d-intruder", signing_key=_public(intruder)).sites,
        signatures=dict(roster.signatures),
    )
    forged = sign_roster(forged, private_key=intruder)
    with pytest.raises(RosterError, match="signature of site 'a' does not match this roster"):
        verify_roster(forged)
    with pytest.raises(RosterError, match="not the roster you agreed to"):
        verify_roster(forged, pinned_digest=roster.digest)


def test_a_swapped_key_breaks_its_own_and_every_other_signature() -> None:
    roster, keys = _signed(["a", "b"])
    swapped = Roster(
        federation=roster.federation,
        sites=add_site(
            add_site(create_roster("hospitals"), name="a", signing_key=_public(_key())),
            name="b",
            signing_key=_public(keys["b"]),
        ).sites,
        signatures=dict(roster.signatures),
    )
    with pytest.raises(RosterError, match=r"'a' does not match.*'b' does not match"):
        verify_roster(swapped)


def test_signatures_of_sites_not_listed_are_refused() -> None:
    roster, _ = _signed(["a", "b"])
    stray = Roster(
        federation=roster.federation,
        sites=roster.sites,
        signatures={**roster.signatures, "ghost": bytes(64)},
    )
    with pytest.raises(RosterError, match=r"signatures of \['ghost'\], which it does not list"):
        verify_roster(stray)


def test_only_a_listed_key_can_sign() -> None:
    roster, _ = _signed(["a"])
    with pytest.raises(RosterError, match="is not in the roster of 'hospitals': have it added"):
        sign_roster(roster, private_key=_key())


@pytest.mark.parametrize("name", ["", "a|b", "-x", "a b", "a" * 65])
def test_bad_site_names_are_refused(name: str) -> None:
    with pytest.raises(RosterError, match="use 1-64 letters, digits"):
        add_site(create_roster("f"), name=name, signing_key=_public(_key()))


def test_one_name_or_one_key_per_site() -> None:
    key = _key()
    roster = add_site(create_roster("f"), name="a", signing_key=_public(key))
    with pytest.raises(RosterError, match="already in the roster"):
        add_site(roster, name="a", signing_key=_public(_key()))
    with pytest.raises(RosterError, match="already the key of 'a'"):
        add_site(roster, name="b", signing_key=_public(key))
    with pytest.raises(RosterError, match="32 bytes"):
        add_site(roster, name="b", signing_key=b"short")


def test_an_empty_roster_does_not_verify() -> None:
    with pytest.raises(RosterError, match="lists no site: add the sites"):
        verify_roster(create_roster("f"))


def test_file_round_trip_is_exact_and_world_readable_only(tmp_path: Path) -> None:
    roster, _ = _signed(["a", "b", "c"])
    path = tmp_path / "roster.json"
    save_roster(roster, path)
    loaded = load_roster(path)
    assert loaded == roster and loaded.digest == roster.digest
    verify_roster(loaded, pinned_digest=roster.digest)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".roster.json.*"))  # no temporary file left


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "a roster is a JSON object"),
        ('{"format": "x"}', "expected 'fedmm-roster/1'"),
        ('{"format": "fedmm-roster/1", "federation": "f", "extra": 1}', r"unknown field\(s\)"),
        (
            '{"format": "fedmm-roster/1", "federation": "f", "sites": [{"name": "a"}]}',
            "exactly 'name' and 'signing-key'",
        ),
        (
            '{"format": "fedmm-roster/1", "federation": "f", '
            '"sites": [{"name": "a", "signing-key": "zz"}]}',
            "is not hex",
        ),
        ('{"format": "fedmm-roster/1", "federation": "a b"}', "federation name 'a b'"),
    ],
)
def test_a_broken_file_is_refused_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "roster.json"
    path.write_text(text)
    with pytest.raises(RosterError, match=message) as error:
        load_roster(path)
    assert str(path) in str(error.value)


def test_a_missing_file_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(RosterError, match="does not exist: create it"):
        load_roster(tmp_path / "nope.json")


def test_the_description_shows_what_to_compare_over_a_second_channel() -> None:
    roster, keys = _signed(["a", "b"])
    roster = add_site(roster, name="c", signing_key=_public(_key()))
    roster = sign_roster(roster, private_key=keys["a"])
    text = describe_roster(roster)
    assert format_digest(roster.digest) in text
    assert fingerprint(_public(keys["b"])) in text
    assert "sites: 3, signed: 1" in text
    assert [row.signed for row in roster_fingerprints(roster)] == [True, False, False]
    assert len(fingerprint(b"x").replace(" ", "")) == 64


def test_a_pinned_digest_is_parsed_with_or_without_spaces() -> None:
    digest = bytes(range(32))
    assert parse_digest(digest.hex(), source="policy") == digest
    spaced = " ".join(digest.hex()[i : i + 4] for i in range(0, 64, 4))
    assert parse_digest(spaced.upper(), source="policy") == digest
    with pytest.raises(RosterError, match="policy: 'abc' is not a roster digest"):
        parse_digest("abc", source="policy")


def test_the_file_lists_names_keys_and_signatures_only() -> None:
    roster, _ = _signed(["a", "b"])
    document = json.loads(roster.to_json())
    assert set(document) == {"format", "federation", "sites", "signatures"}
    assert set(document["signatures"]) == {"a", "b"}


def test_copies_signed_separately_merge_into_one_signed_roster() -> None:
    keys = {name: _key() for name in ("a", "b", "c")}
    roster = create_roster("hospitals")
    for name, key in keys.items():
        roster = add_site(roster, name=name, signing_key=_public(key))
    copies = [sign_roster(roster, private_key=key) for key in keys.values()]
    merged = merge_signatures(copies)
    verify_roster(merged, pinned_digest=roster.digest)
    other = add_site(roster, name="d", signing_key=_public(_key()))
    with pytest.raises(RosterError, match="copy 2 lists other sites or keys"):
        merge_signatures([copies[0], sign_roster(other, private_key=keys["b"])])
    with pytest.raises(RosterError, match="different signatures of 'a'"):
        forged = Roster(roster.federation, roster.sites, {"a": bytes(64)})
        merge_signatures([copies[0], forged])
