"""Active-coordinator mode on Flower rounds: the real coordinator and the real site handlers.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, section 6; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020. Every site has a roster signing key in a 0600 file and the roster file
every site signed (made with the ceremony's own functions), names both in its node config
and pins the roster's digest in its policy. ``SecAggPlusAggregation`` runs the round
through an in-process Grid (``tests.server.in_process_grid``) that hands each message to the
site's real handler, so these tests run the real messages, signatures, bindings and the
consistency exchange in a second or two, without Ray.

The attacks are a malicious coordinator's: the real coordinator's requests, rewritten on
their way to the sites (``InProcessGrid.rewrite``), or messages the test sends itself. In
each, the honest sites refuse with the code ``unauthenticated`` and reveal nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.secagg.site_identity import (
    ROSTER_FILE_KEY,
    SIGNING_KEY_FILE_KEY,
    sign_roster_file,
)
from fedmm.client.secagg.site_signing_key import create_site_signing_key
from fedmm.client.secure_aggregation import SiteContribution
from fedmm.common.secagg.graph_seed import graph_seed
from fedmm.common.secagg.key_agreement import generate_private_key, public_key_for
from fedmm.common.secagg.neighbour_graph import neighbour_graph
from fedmm.common.secagg.roster import add_site, create_roster, format_digest, save_roster
from fedmm.common.secagg.round_config import SecAggRoundConfig
from fedmm.common.secagg.round_signatures import advertised_keys_message, round_keys_message
from fedmm.common.secure_round import (
    MESSAGE_CONSISTENCY,
    MESSAGE_MASKED,
    MESSAGE_SETUP,
    MESSAGE_SETUP_SHARE,
    MESSAGE_SHARE,
    MESSAGE_UNMASK,
    RECORD_SECAGG,
    RECORD_STATUS,
    flatten_update,
)
from fedmm.common.site_refusal import RefusalCode, status_payload
from fedmm.server.secure_aggregation import (
    SecAggPlusAggregation,
    SecAggSettings,
    load_federation_roster,
)
from tests.server.in_process_grid import InProcessGrid, run_secure_round

SHAPES = {"a.weight": (30, 20), "a.bias": (20,), "b": (7, 3, 5)}
NODES = [11, 2**64 - 3, 2**63 + 5, 40, 55, 77]
UNAUTHENTICATED = RefusalCode.UNAUTHENTICATED.value


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


class Federation:
    """Sites on disk after the roster ceremony: keys (0600), the signed roster, the pins."""

    def __init__(self, root: Path, nodes: list[int]) -> None:
        self.root = root
        self.nodes = nodes
        self.names = {node: f"hospital-{index}" for index, node in enumerate(nodes)}
        self.key_files = {node: root / self.names[node] / "roster-key" for node in nodes}
        roster = create_roster("wiring-test")
        for node in nodes:
            public = create_site_signing_key(self.key_files[node])
            roster = add_site(roster, name=self.names[node], signing_key=public)
        self.roster_file = root / "roster.json"
        save_roster(roster, self.roster_file)
        for node in nodes:
            sign_roster_file(roster_file=self.roster_file, signing_key_file=self.key_files[node])
        self.roster = load_federation_roster(str(self.roster_file))

    def node_configs(self, **policy: Any) -> dict[int, dict[str, Any]]:
        """Each site's node config: its files, the pinned digest, active mode demanded."""
        return {
            node: {
                ROSTER_FILE_KEY: str(self.roster_file),
                SIGNING_KEY_FILE_KEY: str(self.key_files[node]),
                "secagg-roster-digest": format_digest(self.roster.digest),
                "secagg-require-active-coordinator": True,
                "secagg-spill-dir": str(self.root),
                **policy,
            }
            for node in self.nodes
        }


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    return Federation(tmp_path, NODES)


class Trainer:
    """Setup's task: a numpy update per site and round (the simulation tests run DP-SGD)."""

    def __init__(self) -> None:
        self.updates: dict[tuple[int, int], np.ndarray] = {}
        self.weights: dict[tuple[int, int], int] = {}

    def __call__(self, msg: Message, context: Context) -> SiteContribution:
        node = context.node_id
        keys = list(msg.content.array_records["arrays"].keys())
        server_round = int(msg.content.config_records["config"]["server_round"])
        rng = np.random.default_rng([node % 2**32, server_round])
        update = flatten_update({k: rng.normal(0, 0.05, SHAPES[k]) for k in keys}, keys)
        self.updates[node, server_round] = update
        self.weights[node, server_round] = int(rng.integers(50, 500))
        return SiteContribution(
            vector=update,
            weight=self.weights[node, server_round],
            metrics={"steps": 3},
            epsilon_bound=0.5,
        )

    def plain_mean(self, sites: list[int], server_round: int) -> np.ndarray:
        weights = [self.weights[site, server_round] for site in sites]
        total = sum(
            w * np.clip(self.updates[site, server_round], -1, 1)
            for site, w in zip(sites, weights, strict=True)
        )
        return total / sum(weights)


def _arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


def _grid(federation: Federation, trainer: Trainer, **kwargs: Any) -> InProcessGrid:
    return InProcessGrid(
        federation.nodes, contribute=trainer, node_configs=federation.node_configs(), **kwargs
    )


def _active(federation: Federation, **settings: Any) -> SecAggPlusAggregation:
    return SecAggPlusAggregation(SecAggSettings(roster=federation.roster, **settings))


def _flat(mean: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([mean[key].reshape(-1) for key in SHAPES])


def _codes(grid: InProcessGrid, message_type: str) -> dict[int, str]:
    """Each site's refusal code in its replies to ``message_type`` (refusals only)."""
    codes = {}
    for reply in grid.replies_to(message_type):
        if reply.has_error():
            continue
        status = reply.content.config_records.get(RECORD_STATUS)
        if status is not None and status["refused"]:
            codes[reply.metadata.src_node_id] = str(status["code"])
    return codes


def _payloads(grid: InProcessGrid, message_type: str) -> dict[int, dict[str, Any]]:
    return {
        reply.metadata.src_node_id: dict(reply.content.config_records[RECORD_SECAGG])
        for reply in grid.replies_to(message_type)
        if not reply.has_error() and RECORD_SECAGG in reply.content.config_records
    }


def test_an_active_round_sums_the_sites_updates_in_five_exchanges(federation: Federation) -> None:
    trainer = Trainer()
    grid = _grid(federation, trainer)
    aggregation = _active(federation)
    result = run_secure_round(aggregation, grid, _arrays(), 1)
    assert result.aborted is None and result.count("trained") == len(NODES)
    assert sorted(set(grid.sent_types())) == sorted(
        {MESSAGE_SETUP, MESSAGE_SHARE, MESSAGE_MASKED, MESSAGE_CONSISTENCY, MESSAGE_UNMASK}
    )
    bound = aggregation.last_round.update_error_bound / result.total_weight
    mean = result.mean_update()
    assert mean is not None
    assert np.abs(_flat(mean) - trainer.plain_mean(NODES, 1)).max() <= bound
    assert result.total_weight == sum(trainer.weights[node, 1] for node in NODES)
    assert sorted(aggregation.last_round.stage_sites["consistency"]) == sorted(NODES)
    # Every setup reply carries the site's roster name and its signature on its keys.
    for node, payload in _payloads(grid, MESSAGE_SETUP).items():
        assert payload["site_name"] == federation.names[node]
        assert len(payload["key_signature"]) == 64
    # A second round with new keys and a new session works the same way.
    second = run_secure_round(aggregation, grid, _arrays(), 2)
    assert second.aborted is None and second.count("trained") == len(NODES)


@pytest.mark.parametrize(
    "stage", [MESSAGE_SETUP, MESSAGE_SHARE, MESSAGE_MASKED, MESSAGE_CONSISTENCY, MESSAGE_UNMASK]
)
def test_one_site_lost_at_any_stage_the_active_round_completes(
    federation: Federation, stage: str
) -> None:
    trainer = Trainer()
    grid = _grid(federation, trainer)
    lost = NODES[2]
    grid.fault = lambda kind, node: "error" if (kind == stage and node == lost) else None
    aggregation = _active(federation)
    result = run_secure_round(aggregation, grid, _arrays(), 1)
    assert result.aborted is None
    before_masking = stage in (MESSAGE_SETUP, MESSAGE_SHARE, MESSAGE_MASKED)
    summed = [node for node in NODES if node != lost] if before_masking else NODES
    assert sorted(aggregation.last_round.survivors) == sorted(summed)
    mean = result.mean_update()
    assert mean is not None
    bound = aggregation.last_round.update_error_bound / result.total_weight
    assert np.abs(_flat(mean) - trainer.plain_mean(summed, 1)).max() <= bound


def test_a_site_that_demands_active_mode_refuses_a_round_without_it(
    federation: Federation,
) -> None:
    trainer = Trainer()
    grid = _grid(federation, trainer)
    result = run_secure_round(SecAggPlusAggregation(), grid, _arrays(), 1)
    assert result.aborted is not None
    assert {o.reason for o in result.outcomes} == {RefusalCode.SECAGG_POLICY.value}
    assert not trainer.updates  # refused before training: no privacy spent


def test_a_site_that_demands_active_mode_refuses_a_plain_fedavg_round(
    federation: Federation,
) -> None:
    """Switching secure aggregation off would show the coordinator each update: refused."""
    from fedmm.client.app import train
    from fedmm.server.aggregation import FedAvgAggregation

    grid = InProcessGrid(NODES, app=train, node_configs=federation.node_configs())
    result = run_secure_round(FedAvgAggregation(), grid, _arrays(), 1)
    assert result.weighted_update_sum is None
    assert {o.reason for o in result.outcomes} == {RefusalCode.SECAGG_POLICY.value}
    assert not any(reply.content.array_records for reply in grid.received)  # no update sent


def test_a_site_without_its_roster_refuses_an_active_round(federation: Federation) -> None:
    trainer = Trainer()
    configs = federation.node_configs()
    configs[NODES[0]].pop(SIGNING_KEY_FILE_KEY)
    federation.key_files[NODES[1]].chmod(0o644)  # other users could read it: refused
    grid = InProcessGrid(NODES, contribute=trainer, node_configs=configs)
    result = run_secure_round(_active(federation), grid, _arrays(), 1)
    assert result.aborted is None and result.count("trained") == len(NODES) - 2
    assert _codes(grid, MESSAGE_SETUP) == {
        NODES[0]: RefusalCode.SECAGG_POLICY.value,
        NODES[1]: RefusalCode.SECAGG_POLICY.value,
    }


@pytest.mark.parametrize("signature", ["kept", "coordinator-signed"])
def test_key_substitution_by_the_coordinator_is_refused(
    federation: Federation, signature: str
) -> None:
    """The coordinator swaps the target's public keys for its own in everyone's share-keys
    request, to open the shares the others seal for the target."""
    trainer = Trainer()
    grid = _grid(federation, trainer)
    target = NODES[3]
    own_key = public_key_for(generate_private_key())
    forger = Ed25519PrivateKey.generate()

    def substitute(kind: str, node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if kind != MESSAGE_SHARE or node == target:
            return payload
        index = payload["site_ids"].index(target)
        payload["channel_public_keys"][index] = own_key
        if signature == "coordinator-signed":
            config = SecAggRoundConfig.from_payload(setup_payload[node])
            payload["key_signatures"][index] = forger.sign(
                round_keys_message(
                    parameters_digest=config.digest(),
                    site_id=target,
                    site_name=federation.names[target],
                    channel_public_key=own_key,
                    mask_public_key=payload["mask_public_keys"][index],
                )
            )
        return payload

    setup_payload: dict[int, dict[str, Any]] = {}

    def record_setup(kind: str, node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if kind == MESSAGE_SETUP:
            setup_payload[node] = dict(payload)
        return substitute(kind, node, payload)

    grid.rewrite = record_setup
    result = run_secure_round(_active(federation), grid, _arrays(), 1)
    assert result.aborted is not None
    refused = _codes(grid, MESSAGE_SHARE)
    assert refused == {node: UNAUTHENTICATED for node in NODES if node != target}
    assert not grid.replies_to(MESSAGE_MASKED)  # nobody sealed a share for the impostor


def test_a_replayed_round_key_from_an_earlier_round_is_refused(federation: Federation) -> None:
    """Round 1 completes; in round 2 the coordinator sends everyone the target's signed keys
    of round 1, whose secrets it may have rebuilt when the target dropped out then."""
    trainer = Trainer()
    grid = _grid(federation, trainer)
    aggregation = _active(federation, advertise_next_keys=False)  # round 2 runs setup
    assert run_secure_round(aggregation, grid, _arrays(), 1).aborted is None
    target = NODES[1]
    old = _payloads(grid, MESSAGE_SETUP)[target]

    def replay(kind: str, node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if kind != MESSAGE_SHARE or node == target:
            return payload
        index = payload["site_ids"].index(target)
        payload["channel_public_keys"][index] = old["channel_public_key"]
        payload["mask_public_keys"][index] = old["mask_public_key"]
        payload["key_signatures"][index] = old["key_signature"]
        return payload

    grid.received.clear()
    grid.rewrite = replay
    result = run_secure_round(aggregation, grid, _arrays(), 2)
    assert result.aborted is not None
    assert _codes(grid, MESSAGE_SHARE) == {
        node: UNAUTHENTICATED for node in NODES if node != target
    }


@pytest.mark.parametrize("name", ["not-in-the-roster", "hospital-absent"])
def test_an_unknown_site_not_in_the_roster_is_refused(tmp_path: Path, name: str) -> None:
    """The coordinator runs a node of its own (a Sybil) in the round, under a new name or
    the name of a roster site that is not connected, with keys signed by a key of its own."""
    federation = Federation(tmp_path, [*NODES, 99])  # site 99 is in the roster, offline
    sybil = 2**62 + 9
    trainer = Trainer()
    forger = Ed25519PrivateKey.generate()
    sybil_name = federation.names[99] if name == "hospital-absent" else name

    def sybil_site(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type != MESSAGE_SETUP:
            return Message(RecordDict({}), reply_to=msg)
        request = dict(msg.content.config_records[RECORD_SECAGG])
        config = SecAggRoundConfig.from_payload(request)
        channel, mask = (public_key_for(generate_private_key()) for _ in range(2))
        signature = forger.sign(
            round_keys_message(
                parameters_digest=config.digest(),
                site_id=sybil,
                site_name=sybil_name,
                channel_public_key=channel,
                mask_public_key=mask,
            )
        )
        payload = {
            "round": config.round_id,
            "stage": "setup",
            "channel_public_key": channel,
            "mask_public_key": mask,
            "site_name": sybil_name,
            "key_signature": signature,
        }
        content = RecordDict(
            {
                RECORD_SECAGG: ConfigRecord(payload),
                RECORD_STATUS: ConfigRecord(status_payload(None)),
            }
        )
        return Message(content, reply_to=msg)

    configs = federation.node_configs()
    grid = InProcessGrid(
        [*NODES, sybil], contribute=trainer, node_configs=configs, node_handlers={sybil: sybil_site}
    )

    def admit_sybil(kind: str, node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if kind != MESSAGE_SHARE:
            return payload
        keys = _payloads(grid, MESSAGE_SETUP)[sybil]
        entries = list(
            zip(
                payload["site_ids"],
                payload["participant_names"],
                payload["channel_public_keys"],
                payload["mask_public_keys"],
                payload["key_signatures"],
                strict=True,
            )
        )
        entries.append(
            (
                sybil,
                keys["site_name"],
                keys["channel_public_key"],
                keys["mask_public_key"],
                keys["key_signature"],
            )
        )
        entries.sort()
        fields = (
            "site_ids",
            "participant_names",
            "channel_public_keys",
            "mask_public_keys",
            "key_signatures",
        )
        for position, field in enumerate(fields):
            payload[field] = [entry[position] for entry in entries]
        payload["participant_ids"] = payload["site_ids"]
        return payload

    grid.rewrite = admit_sybil
    aggregation = _active(federation)
    result = run_secure_round(aggregation, grid, _arrays(), 1)
    # The real coordinator already dropped the Sybil's keys; the rewrite put them back.
    assert sybil not in aggregation.last_round.stage_sites["setup"]
    assert result.aborted is not None
    assert _codes(grid, MESSAGE_SHARE) == {node: UNAUTHENTICATED for node in NODES}


def test_a_forged_survivor_set_is_refused(federation: Federation) -> None:
    """The coordinator tells half the sites that one site of the other half dropped out, and
    the other half the converse, then asks each half to unmask with its own half's
    signatures: each half would reveal the mask key of a site whose input is in the sum."""
    trainer = Trainer()
    grid = _grid(federation, trainer)
    first, second = NODES[:3], NODES[3:]
    survivor_sets = {
        **{node: sorted(set(NODES) - {second[0]}) for node in first},
        **{node: sorted(set(NODES) - {first[0]}) for node in second},
    }

    def forge(kind: str, node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if kind == MESSAGE_CONSISTENCY:
            payload["survivor_ids"] = survivor_sets[node]
        return payload

    grid.rewrite = forge
    result = run_secure_round(_active(federation), grid, _arrays(), 1)
    # Every site signed the set it was shown; none of the signatures is over the real U3.
    assert result.aborted is not None and "signed the survivor set" in result.aborted
    signatures = {
        node: payload["survivor_signature"]
        for node, payload in _payloads(grid, MESSAGE_CONSISTENCY).items()
    }
    assert sorted(signatures) == sorted(NODES)
    # Now the coordinator asks each half to unmask, with the signatures of its own half.
    grid.rewrite = None
    unmask = []
    for group in (first, second):
        for node in group:
            request = {
                "round": 1,
                "stage": "unmask",
                "signer_ids": sorted(group),
                "survivor_signatures": [signatures[site] for site in sorted(group)],
            }
            unmask.append(
                Message(
                    RecordDict({RECORD_SECAGG: ConfigRecord(request)}),
                    dst_node_id=node,
                    message_type=MESSAGE_UNMASK,
                )
            )
    grid.received.clear()
    grid.send_and_receive(unmask)
    assert _codes(grid, MESSAGE_UNMASK) == {node: UNAUTHENTICATED for node in NODES}
    assert not _payloads(grid, MESSAGE_UNMASK) or all(
        "seed_shares" not in payload for payload in _payloads(grid, MESSAGE_UNMASK).values()
    )


def test_a_coordinator_chosen_graph_is_refused(federation: Federation) -> None:
    """The coordinator wants a graph of its own choice (a denser one, or one its session
    nonce seeds): the sites refuse any degree or threshold but what the signed parameters
    give, and use the graph the hash of all signed round keys seeds."""
    trainer = Trainer()
    grid = _grid(federation, trainer)
    # No dropouts allowed: the signed parameters give the sparse ring k = c + 1 = 2.
    aggregation = _active(federation, dropout_fraction=0.0)
    grid.rewrite = lambda kind, node, payload: (
        payload | {"degree": 4, "threshold": 3} if kind == MESSAGE_SHARE else payload
    )
    result = run_secure_round(aggregation, grid, _arrays(), 1)
    assert result.aborted is not None
    assert set(_codes(grid, MESSAGE_SHARE)) == set(NODES)
    grid.rewrite = None
    grid.received.clear()
    grid.sent.clear()
    result = run_secure_round(aggregation, grid, _arrays(), 2)
    assert result.aborted is None and aggregation.last_round.degree == 2
    setup = _payloads(grid, MESSAGE_SETUP)
    config = SecAggRoundConfig.from_payload(dict(grid.sent[0].content.config_records["secagg"]))
    seed = graph_seed(
        parameters_digest=config.digest(),
        participant_ids=tuple(sorted(NODES)),
        names={node: setup[node]["site_name"] for node in NODES},
        channel_public_keys={node: setup[node]["channel_public_key"] for node in NODES},
        mask_public_keys={node: setup[node]["mask_public_key"] for node in NODES},
    )
    assert seed != config.session_nonce
    expected = neighbour_graph(site_ids=sorted(NODES), degree=2, seed=seed)
    used = {
        node: set(payload["receiver_ids"])
        for node, payload in _payloads(grid, MESSAGE_SHARE).items()
    }
    assert used == {node: set(peers) for node, peers in expected.items()}


# Three exchanges (plus consistency): keys advertised at unmask, signed for the next round.


def _share_payload_rewrite(rewrite):  # type: ignore[no-untyped-def]
    """A rewrite of the share-keys payload of setup-and-share requests only."""

    def apply(kind: str, node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if kind != MESSAGE_SETUP_SHARE or payload.get("stage") != "share_keys":
            return payload
        return rewrite(node, payload)

    return apply


def test_active_rounds_after_the_first_skip_setup_and_sum_the_same(
    federation: Federation,
) -> None:
    trainer = Trainer()
    grid = _grid(federation, trainer)
    aggregation = _active(federation)
    assert run_secure_round(aggregation, grid, _arrays(), 1).aborted is None
    # Every unmask reply advertises the site's round-2 keys, signed with its roster key.
    for payload in _payloads(grid, MESSAGE_UNMASK).values():
        assert payload["next_round"] == 2 and len(payload["next_key_signature"]) == 64
    for server_round in (2, 3):
        grid.sent.clear()
        result = run_secure_round(aggregation, grid, _arrays(), server_round)
        assert list(dict.fromkeys(grid.sent_types())) == [
            MESSAGE_SETUP_SHARE,
            MESSAGE_MASKED,
            MESSAGE_CONSISTENCY,
            MESSAGE_UNMASK,
        ]
        assert result.aborted is None and result.count("trained") == len(NODES)
        mean = result.mean_update()
        assert mean is not None
        bound = aggregation.last_round.update_error_bound / result.total_weight
        assert np.abs(_flat(mean) - trainer.plain_mean(NODES, server_round)).max() <= bound


@pytest.mark.parametrize("signature", ["kept", "coordinator-signed"])
def test_a_tampered_advertised_key_is_refused(federation: Federation, signature: str) -> None:
    """In a round that skips setup, the coordinator swaps the target's advertised channel
    key for its own in everyone's request (keeping the target's signature, or signing it
    with a key of its own): every other site refuses, and nobody seals a share."""
    trainer = Trainer()
    grid = _grid(federation, trainer)
    aggregation = _active(federation)
    assert run_secure_round(aggregation, grid, _arrays(), 1).aborted is None
    target = NODES[3]
    own_key = public_key_for(generate_private_key())
    forger = Ed25519PrivateKey.generate()

    def substitute(node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if node == target:
            return payload
        index = payload["site_ids"].index(target)
        payload["channel_public_keys"][index] = own_key
        if signature == "coordinator-signed":
            payload["key_signatures"][index] = forger.sign(
                advertised_keys_message(
                    roster_digest=federation.roster.digest,
                    exchange="train",
                    round_id=2,
                    site_id=target,
                    site_name=federation.names[target],
                    channel_public_key=own_key,
                    mask_public_key=payload["mask_public_keys"][index],
                )
            )
        return payload

    grid.received.clear()
    grid.rewrite = _share_payload_rewrite(substitute)
    result = run_secure_round(aggregation, grid, _arrays(), 2)
    assert result.aborted is not None
    assert _codes(grid, MESSAGE_SETUP_SHARE) == {
        node: UNAUTHENTICATED for node in NODES if node != target
    }
    assert not grid.replies_to(MESSAGE_MASKED)
    assert {node for node, r in trainer.updates if r == 2} <= {target}  # refused first


def test_keys_advertised_for_one_round_are_refused_in_another(federation: Federation) -> None:
    """The coordinator keeps the target's signed keys advertised for round 2 and sends them
    in round 3 (whose secrets it may have rebuilt had the target dropped out in round 2):
    the signature names round 2, so every other site refuses."""
    trainer = Trainer()
    grid = _grid(federation, trainer)
    aggregation = _active(federation)
    assert run_secure_round(aggregation, grid, _arrays(), 1).aborted is None
    target = NODES[1]
    advertised = _payloads(grid, MESSAGE_UNMASK)[target]
    assert advertised["next_round"] == 2
    assert run_secure_round(aggregation, grid, _arrays(), 2).aborted is None

    def replay(node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if node == target:
            return payload
        index = payload["site_ids"].index(target)
        payload["channel_public_keys"][index] = advertised["next_channel_public_key"]
        payload["mask_public_keys"][index] = advertised["next_mask_public_key"]
        payload["key_signatures"][index] = advertised["next_key_signature"]
        return payload

    grid.received.clear()
    grid.rewrite = _share_payload_rewrite(replay)
    result = run_secure_round(aggregation, grid, _arrays(), 3)
    assert result.aborted is not None
    assert _codes(grid, MESSAGE_SETUP_SHARE) == {
        node: UNAUTHENTICATED for node in NODES if node != target
    }


def test_a_setup_signed_key_cannot_stand_for_an_advertised_one(federation: Federation) -> None:
    """The two statements are domain-separated: the target's keys signed at round 1's setup
    are refused where keys advertised for round 2 are expected."""
    trainer = Trainer()
    grid = _grid(federation, trainer)
    aggregation = _active(federation)
    assert run_secure_round(aggregation, grid, _arrays(), 1).aborted is None
    target = NODES[4]
    old = _payloads(grid, MESSAGE_SETUP)[target]

    def replay(node: int, payload: dict[str, Any]) -> dict[str, Any]:
        if node == target:
            return payload
        index = payload["site_ids"].index(target)
        payload["channel_public_keys"][index] = old["channel_public_key"]
        payload["mask_public_keys"][index] = old["mask_public_key"]
        payload["key_signatures"][index] = old["key_signature"]
        return payload

    grid.received.clear()
    grid.rewrite = _share_payload_rewrite(replay)
    result = run_secure_round(aggregation, grid, _arrays(), 2)
    assert result.aborted is not None
    assert _codes(grid, MESSAGE_SETUP_SHARE) == {
        node: UNAUTHENTICATED for node in NODES if node != target
    }
