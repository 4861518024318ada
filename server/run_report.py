"""Per-round metrics, the final summary and the human-readable report of a run (the
federated evaluation's section: ``server.federated_eval_report``)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmm.server.federated_eval_report import federated_eval_section, last_federated_eval

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf": JSON has no infinity
    return value


def append_metrics(out_dir: Path, row: dict[str, Any]) -> None:
    with (out_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        handle.flush()


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(out_dir: Path, *, after_round: int) -> None:
    """Drop rows of rounds after ``after_round`` (a resumed run redoes them)."""
    rows = [r for r in read_metrics(out_dir) if int(r["round"]) <= after_round]
    (out_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _plot(rows: list[dict[str, Any]], key: str, ylabel: str, path: Path) -> bool:
    points = [(r["round"], float(r[key])) for r in rows if r.get(key) not in (None, "inf")]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_summary_and_report(
    out_dir: Path, *, config: dict[str, Any], privacy_note: str
) -> dict[str, Any]:
    """``summary.json`` and ``report.md`` (with PNG plots) from ``metrics.jsonl``."""
    rows = [r for r in read_metrics(out_dir) if not r.get("aborted")]
    last = rows[-1] if rows else {}
    summary = {
        "rounds": len(read_metrics(out_dir)),
        "final": last,
        "best_accuracy": max((float(r["accuracy"]) for r in rows if "accuracy" in r), default=None),
        "federated_eval": last_federated_eval(read_metrics(out_dir)),
        "privacy": privacy_note,
        "config": {k: _jsonable(v) for k, v in config.items()},
        "wall_s_total": sum(float(r.get("wall_s", 0)) for r in read_metrics(out_dir)),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    has_acc = _plot(rows, "accuracy", "caption-ranking accuracy", out_dir / "accuracy.png")
    has_loss = _plot(
        rows, "eval_loss", "loss on the held-out test split", out_dir / "eval-loss.png"
    )
    has_eps = _plot(
        rows, "epsilon_bound_max", "epsilon bound (max over sites)", out_dir / "epsilon.png"
    )
    lines = [
        "# Run report",
        "",
        f"Privacy: {privacy_note}",
        "",
        "| round | accuracy | R@1 i2t | R@1 t2i | R@5 i2t | R@5 t2i | eval loss "
        "| epsilon bound | trained | refused | failed | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in read_metrics(out_dir):
        if r.get("aborted"):
            lines.append(f"| {r['round']} | aborted: {r['aborted']} ||||||||||")
            continue
        if "accuracy" not in r:  # evaluated every eval-every rounds, or not by the coordinator
            lines.append(
                f"| {r['round']} | not evaluated ||||||{r['epsilon_bound_max']} | "
                f"{r['sites_trained']} | {r['sites_refused']} | {r['sites_failed']} | "
                f"{float(r['wall_s']):.1f} |"
            )
            continue
        lines.append(
            f"| {r['round']} | {float(r['accuracy']):.4f} | {float(r['r_at_1_i2t']):.3f} | "
            f"{float(r['r_at_1_t2i']):.3f} | {float(r['r_at_5_i2t']):.3f} | "
            f"{float(r['r_at_5_t2i']):.3f} | {float(r['eval_loss']):.4f} | "
            f"{r['epsilon_bound_max']} | {r['sites_trained']} | "
            f"{r['sites_refused']} | {r['sites_failed']} | {float(r['wall_s']):.1f} |"
        )
    lines.append("")
    if has_acc:
        lines.append("![accuracy by round](accuracy.png)")
    if has_loss:
        lines.append("![loss of the global model on the held-out split](eval-loss.png)")
    if has_eps:
        lines.append("![epsilon bound by round](epsilon.png)")
    lines += ["", *federated_eval_section(read_metrics(out_dir), out_dir)]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return summary


SITE_EPSILONS_HEADING = "## Each site's exact epsilon"


def add_site_epsilons(out_dir: Path, epsilons: Mapping[str, tuple[float, float]]) -> None:
    """Put each site's exact epsilon (site -> (epsilon, delta)) into ``summary.json``
    (``site_epsilons``) and ``report.md``. Only a runner that owns the sites' ledgers (a
    simulation) can: deployed sites report only their bound."""
    summary_path = out_dir / "summary.json"
    if not summary_path.exists() or not epsilons:
        return
    summary = json.loads(summary_path.read_text())
    summary["site_epsilons"] = {
        site: {"epsilon": _jsonable(eps), "delta": delta}
        for site, (eps, delta) in sorted(epsilons.items())
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    report = out_dir / "report.md"
    text = report.read_text() if report.exists() else ""
    text = text.split(SITE_EPSILONS_HEADING)[0].rstrip("\n") + "\n\n"
    lines = [
        SITE_EPSILONS_HEADING,
        "",
        "Read by the simulation runner from the simulated sites' ledgers (whole ledger: every "
        "run, the noisy record counts included). The coordinator itself receives only each "
        "site's bound.",
        "",
        "| site | epsilon | delta |",
        "|---|---|---|",
        *(f"| {site} | {eps:.4f} | {delta:g} |" for site, (eps, delta) in sorted(epsilons.items())),
    ]
    report.write_text(text + "\n".join(lines) + "\n")
