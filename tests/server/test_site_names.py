"""Sites' names beside their node ids in the coordinator's log lines; training shortfall."""

from __future__ import annotations

import json
from pathlib import Path

from fedmm.server.run_submission import training_shortfall
from fedmm.server.site_names import name_node_ids, sites_section


def test_node_ids_in_log_lines_get_the_sites_names() -> None:
    names = {8315068100262911525: "site-a", 6593452540181454052: "site-b"}
    line = "site 8315068100262911525 refused round 12: privacy-budget (run 8315068100262911)"
    assert name_node_ids(line, names) == (
        "site 8315068100262911525 (site-a) refused round 12: privacy-budget (run 8315068100262911)"
    )
    assert name_node_ids("epsilon 3.8315068100262911525", names) == "epsilon 3.8315068100262911525"
    assert name_node_ids(line, {}) == line
    assert "| 6593452540181454052 | site-b |" in sites_section(names)


def test_a_run_that_trained_fewer_rounds_than_asked_says_which_and_why(tmp_path: Path) -> None:
    rows = [
        {"round": 1, "sites_trained": 2, "sites_refused": 0, "sites_failed": 0},
        {"round": 2, "sites_trained": 0, "sites_refused": 2, "sites_failed": 0,
         "aborted": "no site trained this round (2 refused, 0 failed)"},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = training_shortfall(tmp_path, num_server_rounds=2)
    assert said is not None and said.startswith("sites trained in 1 of the 2 rounds")
    assert "round 2: no site trained this round (2 refused, 0 failed)" in said
    assert training_shortfall(tmp_path, num_server_rounds=1) is None
    (tmp_path / "metrics.jsonl").unlink()
    assert training_shortfall(tmp_path, num_server_rounds=1).startswith("sites trained in 0 ")
