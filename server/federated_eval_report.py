"""The run report's federated-evaluation section: the ``federated_eval`` object of each
evaluated round of ``metrics.jsonl`` as a table, and recall@10 against its controls (the
chance level and the shuffled pairing, ``common.federated_eval``) as a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_FILE = "federated-recall.png"
#: The plotted rates: (key of the federated_eval object, legend).
_CURVES = (
    ("r_at_10_i2t", "R@10 image->text"),
    ("r_at_10_t2i", "R@10 text->image"),
    ("r_at_10_i2t_shuffled", "R@10 image->text, shuffled pairs"),
    ("chance_r_at_10", "chance"),
)
_COLUMNS = (
    "r_at_1_i2t",
    "r_at_5_i2t",
    "r_at_10_i2t",
    "r_at_1_t2i",
    "r_at_5_t2i",
    "r_at_10_t2i",
    "chance_r_at_10",
    "r_at_10_i2t_shuffled",
    "caption_bank_accuracy",
)


def evaluated_rows(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(round, federated_eval) of every round with a federated evaluation."""
    return [(int(r["round"]), r["federated_eval"]) for r in rows if r.get("federated_eval")]


def last_federated_eval(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last federated evaluation that released totals (for the summary)."""
    released = [(n, e) for n, e in evaluated_rows(rows) if "records" in e]
    if not released:
        return None
    server_round, evaluation = released[-1]
    return {"round": server_round, **evaluation}


def _plot(evaluations: list[tuple[int, dict[str, Any]]], path: Path) -> bool:
    released = [(n, e) for n, e in evaluations if "records" in e]
    if not released:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, label in _CURVES:
        points = [(n, float(e[key])) for n, e in released if key in e]
        style = "--" if key in ("chance_r_at_10", "r_at_10_i2t_shuffled") else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("recall on the sites' held-out records")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def federated_eval_section(rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Markdown lines of the section (none when the run evaluated at no site); writes the
    plot next to the report."""
    evaluations = evaluated_rows(rows)
    if not evaluations:
        return []
    lines = [
        "## Federated evaluation on the sites' held-out records",
        "",
        "Summed under SecAgg+ over the sites evaluated: the coordinator sees only totals.",
        "",
        "| round | records | sites | " + " | ".join(_COLUMNS) + " |",
        "|---" * (len(_COLUMNS) + 3) + "|",
    ]
    for server_round, evaluation in evaluations:
        if "records" not in evaluation:
            reason = evaluation.get("aborted", "nothing released")
            lines.append(f"| {server_round} | not released: {reason} |" + " |" * len(_COLUMNS))
            continue
        values = [f"{float(evaluation[key]):.3f}" if key in evaluation else "" for key in _COLUMNS]
        lines.append(
            f"| {server_round} | {evaluation['records']} | {evaluation['sites_evaluated']} | "
            + " | ".join(values)
            + " |"
        )
    lines.append("")
    if _plot(evaluations, out_dir / PLOT_FILE):
        lines.append(f"![federated recall@10 and its controls by round]({PLOT_FILE})")
        lines.append("")
    return lines
