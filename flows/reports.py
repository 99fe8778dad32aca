"""What a Prefect run shows in its UI: the stage table, the evaluation table and the champion
decision as markdown artifacts, each with links to the MLflow runs behind it.

The markdown builders are plain functions of the tasks' JSON results (tested directly);
``publish`` creates the artifact in the current flow or task run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Link = Callable[[str | None], str]


def _num(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def stages_markdown(stages: list[dict[str, Any]], link: Link) -> str:
    rows = ["| stage | steps | loss | mean IU | pixel acc | time s | checkpoint | MLflow run |",
            "|---|---:|---:|---:|---:|---:|---|---|"]
    for s in stages:
        m = s["metrics"]
        rows.append(f"| FCN-{s['stage']} | {s['steps']} | {_num(m.get('loss'))} | "
                    f"{_num(m.get('mean_iu'))} | {_num(m.get('pixel_acc'))} | "
                    f"{s['seconds']:.0f} | `{s['checkpoint']}` | {link(s['mlflow_run'])} |")
    return "## Training stages\n\n" + "\n".join(rows) + "\n"


def evaluation_markdown(summary: dict[str, Any], label: str, link: Link) -> str:
    m = summary["metrics"]
    head = (f"## Evaluation of {label} on `{summary['split']}` ({summary['images']} images)\n\n"
            f"Model `{summary['model']}`; MLflow run {link(summary.get('mlflow_run'))}\n\n"
            "| pixel acc | mean acc | mean IU | f.w. IU |\n|---:|---:|---:|---:|\n"
            f"| {_num(m.get('pixel_acc'))} | {_num(m.get('mean_acc'))} | "
            f"{_num(m.get('mean_iu'))} | {_num(m.get('fw_iu'))} |\n")
    per_class = summary.get("per_class_iu") or {}
    if not per_class:
        return head
    rows = ["| class | IU |", "|---|---:|"]
    rows += [f"| {name} | {_num(iu)} |" for name, iu in per_class.items()]
    return head + "\n" + "\n".join(rows) + "\n"


def decision_markdown(reg: dict[str, Any], link: Link, run_id: str | None) -> str:
    took = "took" if reg["champion"] else "did not take"
    head = (f"{reg['name']} version {reg['version']} was registered from this checkpoint "
            "before" if reg.get("reused") else
            f"{reg['name']} version {reg['version']} {took} the champion alias")
    return (f"## Champion gate: {head}\n\n{reg['decision']}\n\n"
            f"Look it up as `models:/{reg['name']}/{reg['version']}` or "
            f"`models:/{reg['name']}@candidate`"
            + (f", `models:/{reg['name']}@champion`" if reg["champion"] else "")
            + f". Evaluation run: {link(run_id)}\n")


def publish(key: str, markdown: str, description: str) -> None:
    """A markdown artifact in the current Prefect run (keys: lowercase, digits, dashes)."""
    import re

    from prefect.artifacts import create_markdown_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")
    create_markdown_artifact(markdown=markdown, key=key, description=description)
