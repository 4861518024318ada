"""Secure-aggregation arithmetic shared by sites and the coordinator (no Flower, no torch).

The protocol is SecAgg+ from Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, whose complete-graph special case (every site a
neighbour of every other) is the protocol of Bonawitz et al., "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", CCS 2017.

One concern per module:

- ``shamir``: t-out-of-n secret sharing of 32-byte secrets over a prime field.
- ``key_agreement``: X25519 key pairs and HKDF-SHA256 derivations bound to round and pair.
- ``share_cipher``: AES-GCM for the shares routed through the coordinator.
- ``mask_expansion``: a 32-byte seed expanded into a mask vector with AES-256-CTR.
- ``ring``: vectors in Z_(2^b).
- ``quantisation``: clipping and unbiased stochastic rounding into Z_(2^b), with headroom.
- ``neighbour_graph``: the public random k-regular graph, default (k, t) for n sites, and
  the threshold and connectivity bounds a site checks them against.
- ``round_config``: the public parameters of one round, sent by the coordinator at setup.
- ``round_graph``: the graph fixed after setup over the sites that finished it (U1).
- ``aggregation_size``: the fewest sites a released sum may cover.
- ``protocol_stages``: stage names and the round/stage tag every payload carries.
- ``input_encoding``: the layout of the vector a site masks (update, weight, metrics).
- ``payload_validation``: checks on inbound payloads, raising ``InvalidPayloadError``.

Active-coordinator mode (Bonawitz et al., section 6; Bell et al.'s malicious-server variant):

- ``roster``: the federation's sites and their Ed25519 signing keys, signed by every site.
- ``round_signatures``: signed round keys and signed survivor sets, checked against it.
- ``active_parameters``: t = c + 1, the consistency threshold, the dropout allowance, k.
- ``graph_seed``: the ring seed from the hash of the signed round keys, and why grinding it
  does not matter.
- ``round_binding``: parameters, graph and public keys bound into HKDF and AES-GCM.
"""
