"""Noise multiplier and epsilon of a site's run under the RDP and the PLD accountant.

For the default run (or ``--set`` overrides), a site with ``--records`` records and the
policy's record-count noise (``record-count-noise``, 20) charges its noisy count, then
``num-server-rounds`` x ``local-epochs`` x ceil(n / batch) DP-SGD steps at q = 1 / ceil(n /
batch). Prints JSON: the sigma each accountant calibrates for the run's epsilon, and each
sigma's epsilon under both (``client.privacy_ledger``: Opacus RDP over the ledger's orders;
``client.pld_accounting``: dp-accounting's PLD). The count is charged at its true value
here (its noise changes q and the steps by a hair).

Usage::

    python -m fedmm.simulations.benchmarks.accountant_comparison [--records N] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

from fedmm.client.pld_accounting import calibrate_noise_multiplier_pld, pld_epsilon_of
from fedmm.client.privacy_ledger import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    count_charge,
    epsilon_of,
)
from fedmm.client.privacy_policy import SitePrivacyPolicy
from fedmm.common.cli_arguments import key_value_pairs
from fedmm.common.federation_config import FederationConfig


def compare(config: FederationConfig, records: int, count_noise: float) -> dict[str, object]:
    batches = math.ceil(records / config.batch_size)
    rate, steps = 1 / batches, config.num_server_rounds * config.local_epochs * batches
    count = [count_charge(count_noise)]
    ledger = PrivacyLedger(delta=config.delta, history=list(count))
    started = time.monotonic()
    sigma_rdp = calibrate_noise_multiplier(
        epsilon=config.epsilon, delta=config.delta, sample_rate=rate, steps=steps, spent=ledger
    )
    rdp_s = time.monotonic() - started
    started = time.monotonic()
    sigma_pld = calibrate_noise_multiplier_pld(
        epsilon=config.epsilon, delta=config.delta, sample_rate=rate, steps=steps, spent=count
    )
    pld_s = time.monotonic() - started

    def both(sigma: float) -> dict[str, float]:
        history = [*count, (sigma, rate, steps)]
        return {
            "noise_multiplier": sigma,
            "epsilon_rdp": epsilon_of(history, config.delta),
            "epsilon_pld": pld_epsilon_of(history, config.delta),
        }

    return {
        "records": records,
        "target_epsilon": config.epsilon,
        "delta": config.delta,
        "sample_rate": rate,
        "steps": steps,
        "record_count_noise": count_noise,
        "calibrated_by_rdp": both(sigma_rdp) | {"calibration_s": round(rdp_s, 2)},
        "calibrated_by_pld": both(sigma_pld) | {"calibration_s": round(pld_s, 2)},
        "noise_reduction": 1 - sigma_pld / sigma_rdp,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6000, help="a site's records (6000)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = FederationConfig.from_run_config(key_value_pairs(args.set, option="--set"))
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    result = compare(config, args.records, SitePrivacyPolicy().record_count_noise)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
