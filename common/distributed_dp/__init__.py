"""Distributed DP under secure aggregation: the Skellam mechanism in the integer domain.

Each site adds a Skellam share to its integer-quantised sum of clipped per-example gradients;
SecAgg+ reveals only the sum over sites, which carries Skellam noise of the summed variance
(Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
Learning", NeurIPS 2021), with the scaling and conditional randomized rounding of Kairouz,
Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", ICML 2021. Modules: ``skellam`` (CSPRNG noise), ``rounding`` (per-example
integer vectors and their norm bounds), ``accounting`` (RDP of the Poisson-subsampled Skellam
mechanism), ``plan`` (the public parameters of a run).
"""
