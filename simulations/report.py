"""What a user reads after a simulation: per-round progress, a summary, a DP on/off comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def round_line(line: dict[str, Any], rounds: int) -> str:
    server = line["server"]
    head = f"round {line['round']}/{rounds}"
    if line["round"] == 0:
        return f"{head}  initial adapter       acc {server['accuracy']:.3f}  macro-F1 {server['macro_f1']:.3f}"
    eps = [v for v in line.get("epsilon", {}).values() if isinstance(v, (int, float))]
    privacy = f"ε max {max(eps):.2f}" if eps else "DP off"
    failed = f"  {len(line['failures'])} failed" if line["failures"] else ""
    kept = "" if line["model_updated"] else "  (model unchanged: too few sites)"
    return (f"{head}  {line['contributors']} site(s){failed}  acc {server['accuracy']:.3f}  "
            f"macro-F1 {server['macro_f1']:.3f}  loss {server['loss']:.3f}  {privacy}  "
            f"[{line['aggregation']} aggregation, {line['duration_s']:.0f}s]{kept}")


def load_summary(out_dir: Path) -> dict[str, Any]:
    run = json.loads((out_dir / "run.json").read_text())
    lines = [json.loads(text) for text in (out_dir / "metrics.jsonl").read_text().splitlines()]
    privacy_path = out_dir / "privacy.json"
    privacy = json.loads(privacy_path.read_text()) if privacy_path.exists() else {"sites": {}}
    final = lines[-1]
    return {
        "out_dir": str(out_dir),
        "rounds": lines,
        "final": final["server"],
        "majority": run["majority_baseline"],
        "epsilon": {site: report.get("epsilon") for site, report in sorted(privacy["sites"].items())},
        "budget": next((r.get("budget") for r in privacy["sites"].values()), None),
        "dp": run["dp"],
        "aggregation": run["aggregation"],
    }


def summary_text(summary: dict[str, Any]) -> str:
    final, majority = summary["final"], summary["majority"]
    rows = [
        f"final global adapter: accuracy {final['accuracy']:.3f}, macro-F1 {final['macro_f1']:.3f} "
        f"on {final['examples']} test examples",
        f"majority-class baseline: accuracy {majority['accuracy']:.3f}, macro-F1 {majority['macro_f1']:.3f}",
    ]
    if summary["dp"]:
        spent = ", ".join(f"{site} ε={eps:.2f}" for site, eps in summary["epsilon"].items() if eps is not None)
        rows.append(f"privacy spent (budget ε={summary['budget']}): {spent}")
    else:
        rows.append("privacy: DP was OFF — these updates carry no differential-privacy guarantee")
    rows.append(f"outputs: {summary['out_dir']}/metrics.jsonl, privacy.json, final/adapter/")
    return "\n".join(rows)


def comparison_text(without_dp: dict[str, Any], with_dp: dict[str, Any]) -> str:
    """The privacy/utility trade-off side by side, with the majority-class floor."""
    majority = with_dp["majority"]
    eps = [v for v in with_dp["epsilon"].values() if v is not None]
    rows = [
        f"{'':28}{'accuracy':>10}{'macro-F1':>10}   privacy",
        f"{'majority class (floor)':28}{majority['accuracy']:>10.3f}{majority['macro_f1']:>10.3f}   -",
        f"{'federated, DP off':28}{without_dp['final']['accuracy']:>10.3f}{without_dp['final']['macro_f1']:>10.3f}"
        "   none",
        f"{'federated, DP on':28}{with_dp['final']['accuracy']:>10.3f}{with_dp['final']['macro_f1']:>10.3f}"
        f"   ε ≤ {max(eps) if eps else float('nan'):.2f} per site (budget {with_dp['budget']})",
    ]
    return "\n".join(rows)
