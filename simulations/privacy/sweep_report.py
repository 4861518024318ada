"""The sweep's table (markdown and JSON) and plots (PNG): accuracy against epsilon, and the
attacks' ROC curves on log-log axes (Carlini et al., IEEE S&P 2022: the low false-positive
region is what matters, and only a log scale shows it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TABLE_JSON = "privacy-sweep.json"
TABLE_MD = "privacy-sweep.md"
ACCURACY_PNG = "accuracy-vs-epsilon.png"
ROC_PNG = "roc-curves.png"


def _eps(value: Any) -> float:
    return float(value)  # "inf" (JSON) -> inf


def _attack(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in result["membership"]["attacks"] if a["attack"] == name)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    number = float(value)
    return "inf" if math.isinf(number) else f"{number:.{digits}f}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per point: what the markdown table shows, for the JSON table too."""
    rows = []
    for r in results:
        epsilons = r["site_epsilons"]
        loss, lira = _attack(r, "loss threshold"), _attack(r, "offline LiRA")
        rows.append(
            {
                "point": r["name"],
                "partition": r["partition"],
                "epsilon_target": _eps(r["epsilon_target"]),
                "accuracy": r["accuracy"],
                "r_at_1_i2t": r["r_at_1_i2t"],
                "r_at_1_t2i": r["r_at_1_t2i"],
                "epsilon_site_min": min((e["opacus_rdp"] for e in epsilons), default=math.inf),
                "epsilon_site_max": max((e["opacus_rdp"] for e in epsilons), default=math.inf),
                "epsilon_dp_accounting_rdp_max": max(
                    (e["dp_accounting_rdp"] for e in epsilons), default=math.inf
                ),
                "epsilon_dp_accounting_pld_max": max(
                    (e["dp_accounting_pld"] for e in epsilons), default=math.inf
                ),
                "delta": r["delta"],
                "noise_multiplier_max": max((e["noise_multiplier"] for e in epsilons), default=0),
                "rounds": r["rounds"],
                "train_wall_s": r["train_wall_s"],
                "loss_auc": loss["auc"],
                "loss_tpr_at_0_1_fpr": loss["tpr_at_0_1_fpr"],
                "lira_auc": lira["auc"],
                "lira_tpr_at_0_1_fpr": lira["tpr_at_0_1_fpr"],
                "lira_tpr_at_1_fpr": lira["tpr_at_1_fpr"],
                "num_members": lira["num_members"],
                "num_non_members": lira["num_non_members"],
            }
        )
    return rows


def audit_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per one-run audit point (``audit_run``)."""
    rows = []
    for r in results:
        audit, epsilons = r["audit"], r["site_epsilons"]
        rows.append(
            {
                "point": r["name"],
                "partition": r["partition"],
                "epsilon_target": _eps(r["epsilon_target"]),
                "epsilon_site_max": max((e["opacus_rdp"] for e in epsilons), default=math.inf),
                "epsilon_dp_accounting_pld_max": max(
                    (e["dp_accounting_pld"] for e in epsilons), default=math.inf
                ),
                "noise_multiplier_max": max((e["noise_multiplier"] for e in epsilons), default=0),
                "delta": r["delta"],
                "epsilon_lower_bound": audit["epsilon_lower_bound"],
                "confidence": audit["confidence"],
                "canaries": audit["canaries"],
                "canaries_included": audit["included"],
                "best_k_in": audit["best"]["k_in"],
                "best_k_out": audit["best"]["k_out"],
                "best_correct": audit["best"]["correct"],
                "best_guesses": audit["best"]["guesses"],
                "mean_margin_in": audit["mean_margin_in"],
                "mean_margin_out": audit["mean_margin_out"],
                "accuracy": r["accuracy"],
                "rounds": r["rounds"],
                "train_wall_s": r["train_wall_s"],
            }
        )
    return rows


def audit_markdown_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| point | target epsilon | accounted epsilon (max per site, Opacus RDP; PLD) | sigma | "
        "empirical epsilon (lower bound) | confidence | canaries (in) | best guesses "
        "(correct / made) | mean margin in / out | accuracy | train wall time |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        private = math.isfinite(r["epsilon_site_max"])
        accounted = (
            f"{r['epsilon_site_max']:.3f} ({r['epsilon_dp_accounting_pld_max']:.3f})"
            if private
            else "inf (no DP)"
        )
        lines.append(
            f"| {r['point']} | {_fmt(r['epsilon_target'], 0)} | {accounted} | "
            f"{_fmt(r['noise_multiplier_max'], 3) if private else '0'} | "
            f"**{r['epsilon_lower_bound']:.3f}** | {100 * r['confidence']:.0f}% | "
            f"{r['canaries']} ({r['canaries_included']}) | "
            f"{r['best_correct']} / {r['best_guesses']} | "
            f"{r['mean_margin_in']:.3f} / {r['mean_margin_out']:.3f} | "
            f"{_percent(float(r['accuracy']))} | {r['train_wall_s']:.0f} s |"
        )
    return "\n".join(lines)


AUDIT_NOTE = (
    "One-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023): canaries (held-out items "
    "captioned with a wrong class) inserted at the sites, each included with probability "
    "1/2 by a keyed bit; one federated run; each canary scored by the final model's margin of "
    "its wrong caption over its true class's caption; guesses: in for the highest margins, "
    "out for the lowest; the number of correct guesses gives "
    "an epsilon lower bound at the stated confidence (Bonferroni over the guess counts "
    "tried). DP holds only if the bound is at or below the accounted epsilon."
)


def gradient_audit_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per white-box audit point (``gradient_canary_audit``)."""
    rows = []
    for r in results:
        run = r["gradient_audit"]
        audit = run["audit"]
        rows.append(
            {
                "point": r["name"],
                "epsilon_target": _eps(run["epsilon_target"]),
                "epsilon_accounted": _eps(run["epsilon_accounted"]),
                "delta": run["delta"],
                "noise_multiplier": run["noise_multiplier"],
                "sample_rate": run["sample_rate"],
                "steps": run["steps"],
                "records": run["records"],
                "epsilon_lower_bound": audit["epsilon_lower_bound"],
                "max_certifiable_epsilon": run["max_certifiable_epsilon"],
                "confidence": audit["confidence"],
                "canaries": audit["canaries"],
                "canaries_included": audit["included"],
                "best_k_in": audit["best"]["k_in"],
                "best_k_out": audit["best"]["k_out"],
                "best_correct": audit["best"]["correct"],
                "best_guesses": audit["best"]["guesses"],
                "mean_score_in": run["mean_score_in"],
                "mean_score_out": run["mean_score_out"],
                "mean_appearances_in": run["mean_appearances_in"],
                "wall_s": run["wall_s"],
            }
        )
    return rows


def gradient_audit_markdown_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| point | target epsilon | accounted epsilon (Opacus RDP) | sigma | q | steps | "
        "canaries (in) | best guesses (correct / made) | empirical epsilon (lower bound) | "
        "most the canaries can certify | confidence | mean score in / out | wall time |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        private = math.isfinite(r["epsilon_accounted"])
        lines.append(
            f"| {r['point']} | {_fmt(r['epsilon_target'], 0)} | "
            f"{_fmt(r['epsilon_accounted']) if private else 'inf (no noise)'} | "
            f"{_fmt(r['noise_multiplier'])} | {r['sample_rate']:.4f} | {r['steps']} | "
            f"{r['canaries']} ({r['canaries_included']}) | "
            f"{r['best_correct']} / {r['best_guesses']} | "
            f"**{r['epsilon_lower_bound']:.3f}** | {r['max_certifiable_epsilon']:.3f} | "
            f"{100 * r['confidence']:.0f}% | "
            f"{r['mean_score_in']:.2f} / {r['mean_score_out']:.2f} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


GRADIENT_AUDIT_NOTE = (
    "White-box one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023, Sec. 7): Dirac "
    "gradient canaries (the clip norm on one coordinate each, distinct coordinates), each "
    "included with probability 1/2 by a keyed bit, joining each step's Poisson batch at the "
    "records' rate q in one DP-SGD run of site 0's own step (clipping, CSPRNG noise at the "
    "calibrated sigma, accountant) on its real records and model; the auditor sees every "
    "step's released gradient and scores a canary by the sum over steps of its coordinate. "
    "It audits the site's DP-SGD step and accountant, not the federation. DP holds only if "
    "the bound is at or below the accounted epsilon."
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| point | partition | target epsilon | accuracy | R@1 i2t / t2i | epsilon per site "
        "(min-max, Opacus RDP) | max epsilon, dp-accounting RDP / PLD | sigma | rounds | "
        "train wall time | loss AUC | loss TPR@0.1% FPR | LiRA AUC | LiRA TPR@0.1% FPR | "
        "LiRA TPR@1% FPR | members / non-members |"
    )
    lines = [header, "|" + "---|" * 16]
    for r in rows:
        private = math.isfinite(r["epsilon_site_max"])
        site_eps = (
            f"{r['epsilon_site_min']:.3f}-{r['epsilon_site_max']:.3f}" if private else "inf (no DP)"
        )
        google = (
            f"{r['epsilon_dp_accounting_rdp_max']:.3f} / {r['epsilon_dp_accounting_pld_max']:.3f}"
            if private
            else "-"
        )
        lines.append(
            f"| {r['point']} | {r['partition']} | {_fmt(r['epsilon_target'], 0)} | "
            f"{_percent(float(r['accuracy']))} | {_percent(float(r['r_at_1_i2t']))} / "
            f"{_percent(float(r['r_at_1_t2i']))} | {site_eps} | {google} | "
            f"{_fmt(r['noise_multiplier_max'], 3) if private else '0'} | {r['rounds']} | "
            f"{r['train_wall_s']:.0f} s | {r['loss_auc']:.3f} | "
            f"{_percent(r['loss_tpr_at_0_1_fpr'])} | {r['lira_auc']:.3f} | "
            f"{_percent(r['lira_tpr_at_0_1_fpr'])} | {_percent(r['lira_tpr_at_1_fpr'])} | "
            f"{r['num_members']} / {r['num_non_members']} |"
        )
    return "\n".join(lines)


def _plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["epsilon_target"] for r in rows if math.isfinite(r["epsilon_target"])]
    inf_x = 2.5 * max(finite) if finite else 10.0  # where "no DP" is drawn
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    overfit = [r for r in rows if r["point"].startswith("overfit")]
    main = [r for r in rows if not r["point"].startswith("overfit")]
    groups = [
        (partition, [r for r in main if r["partition"] == partition], "o-")
        for partition in sorted({r["partition"] for r in main})
    ]
    if overfit:
        groups.append(("overfit recipe", overfit, "s--"))
    for label, members, style in groups:
        points = sorted(
            (r["epsilon_target"] if math.isfinite(r["epsilon_target"]) else inf_x, r["accuracy"])
            for r in members
        )
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    ax.set_xscale("log")
    ticks = [*sorted(set(finite)), inf_x]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["inf\n(no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("epsilon per site (record-level, delta = 1e-5)")
    ax.set_ylabel("caption-ranking accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_roc(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["partition"] for r in results if not r["overfit"]})
    overfit = [r for r in results if r["overfit"]]
    panels = [(g, [r for r in results if r["partition"] == g and not r["overfit"]]) for g in groups]
    if overfit:
        private = any(math.isfinite(float(r["epsilon_target"])) for r in overfit)
        panels.append(("overfit recipe" if private else "overfit (non-private)", overfit))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (title, members) in zip(axes[0], panels, strict=True):
        smallest = 1.0
        for index, r in enumerate(members):
            color = f"C{index}"
            label = f"eps {_fmt(r['epsilon_target'], 0)}"
            for attack, style in (("offline LiRA", "-"), ("loss threshold", "--")):
                curve = r["membership"]["roc"][attack]
                auc = _attack(r, attack)["auc"]
                ax.plot(
                    curve["fpr"],
                    curve["tpr"],
                    style,
                    color=color,
                    label=f"{label}, {'LiRA' if attack == 'offline LiRA' else 'loss'} "
                    f"(AUC {auc:.2f})",
                )
            smallest = min(smallest, 1.0 / r["membership"]["num_non_members"])
        ax.plot([smallest, 1], [smallest, 1], ":", color="gray", label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(smallest, 1)
        ax.set_ylim(smallest, 1)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_report(
    results: list[dict[str, Any]], *, settings: dict[str, Any], out: Path
) -> dict[str, Path]:
    """``privacy-sweep.md``/``.json`` and the two PNG plots in ``out``; returns their paths."""
    membership = [r for r in results if "membership" in r]
    audits = [r for r in results if "audit" in r]
    rows = table_rows(membership)
    audit_table = audit_rows(audits)
    gradient_table = gradient_audit_rows([r for r in results if "gradient_audit" in r])
    paths = {
        "json": out / TABLE_JSON,
        "markdown": out / TABLE_MD,
        "accuracy_plot": out / ACCURACY_PNG,
        "roc_plot": out / ROC_PNG,
    }

    def jsonable(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value

    paths["json"].write_text(
        json.dumps(
            {
                "settings": settings,
                "rows": [{k: jsonable(v) for k, v in r.items()} for r in rows],
                "audit_rows": [{k: jsonable(v) for k, v in r.items()} for r in audit_table],
                "gradient_audit_rows": [
                    {k: jsonable(v) for k, v in r.items()} for r in gradient_table
                ],
            },
            indent=2,
        )
    )
    text = (
        "# Privacy sweep\n\n"
        "Epsilon: record-level (epsilon, delta)-DP at each site for its own records over the "
        "whole run, Opacus RDP accountant, cross-checked with dp-accounting (RDP; PLD shown "
        "for reference). Attacks: membership of the target site's records against held-out "
        "records of the same partition, on the final global model.\n\n"
    )
    if rows:
        text += (
            markdown_table(rows)
            + f"\n\n![accuracy against epsilon]({ACCURACY_PNG})\n\n![ROC curves]({ROC_PNG})\n"
        )
    if audit_table:
        text += "\n## One-run audit\n\n" + AUDIT_NOTE + "\n\n" + audit_markdown_table(audit_table)
        text += "\n"
    if gradient_table:
        text += "\n## White-box one-run audit (gradient canaries)\n\n" + GRADIENT_AUDIT_NOTE
        text += "\n\n" + gradient_audit_markdown_table(gradient_table) + "\n"
    paths["markdown"].write_text(text)
    if rows:
        _plot_accuracy(rows, paths["accuracy_plot"])
        _plot_roc(membership, paths["roc_plot"])
    else:
        del paths["accuracy_plot"], paths["roc_plot"]
    return paths
