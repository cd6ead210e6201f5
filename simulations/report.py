"""What a user reads after a simulation: per-round progress, a summary, a DP on/off comparison, and
``report.html`` (self-contained, plots embedded) with the same plots as PNGs beside it for papers."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from common.config import TASK_METRICS

BAR_WIDTH = 20
FLOOR_TITLES = {"classification": "majority-class", "causal-lm": "most-common-answer"}


def progress_bar(done: int, total: int) -> str:
    filled = round(BAR_WIDTH * done / max(1, total))
    return "[" + "█" * filled + "·" * (BAR_WIDTH - filled) + "]"


def metric_text(scores: dict[str, Any], task: str) -> str:
    """"accuracy 0.512  macro-F1 0.402" (or the causal-lm metrics)."""
    return "  ".join(f"{name} {scores[key]:.3f}" for key, name in TASK_METRICS[task])


def round_line(line: dict[str, Any], rounds: int, task: str = "classification") -> str:
    """One round in the terminal, with a progress bar; says why a round left the model unchanged."""
    server = line["server"]
    head = f"{progress_bar(line['round'], rounds)} round {line['round']}/{rounds}"
    if line["round"] == 0:
        return f"{head}  initial adapter       {metric_text(server, task)}"
    eps = [v for v in line.get("epsilon", {}).values() if isinstance(v, (int, float))]
    kinds = sorted({failure["kind"] for failure in line["failures"]})
    if line.get("dp") is False:
        privacy = "DP OFF"
    elif eps:
        privacy = f"ε max {max(eps):.2f}" + (f" per {line['privacy_unit']}" if line.get("privacy_unit") else "")
    else:
        privacy = "no site spent ε"
    failed = f"  {len(line['failures'])} failed ({', '.join(kinds)})" if line["failures"] else ""
    kept = "" if line["model_updated"] else (
        f"  (model unchanged: {'every site refused' if not line['contributors'] else 'too few sites'})")
    return (f"{head}  {line['contributors']} site(s){failed}  {metric_text(server, task)}  "
            f"loss {server['loss']:.3f}  {privacy}  "
            f"[{line['aggregation']} aggregation, {line['duration_s']:.0f}s]{kept}")


def load_summary(out_dir: Path) -> dict[str, Any]:
    run = json.loads((out_dir / "run.json").read_text())
    lines = [json.loads(text) for text in (out_dir / "metrics.jsonl").read_text().splitlines()]
    privacy_path = out_dir / "privacy.json"
    privacy = json.loads(privacy_path.read_text()) if privacy_path.exists() else {"sites": {}}
    baselines_path = out_dir / "baselines.json"
    return {
        "out_dir": str(out_dir),
        "task": run.get("task", "classification"),
        "rounds": lines,
        "final": lines[-1]["server"],
        "majority": run["majority_baseline"],
        "epsilon": {site: report.get("epsilon") for site, report in sorted(privacy["sites"].items())},
        "budget": run.get("epsilon_budget"),
        "unit": run.get("privacy_unit", "record").removeprefix("column:"),
        "dp": run["dp"],
        "aggregation": run["aggregation"],
        "baselines": json.loads(baselines_path.read_text()) if baselines_path.exists() else {},
    }


def summary_text(summary: dict[str, Any]) -> str:
    final, majority, task = summary["final"], summary["majority"], summary["task"]
    perplexity = f", perplexity {final['perplexity']:.2f}" if "perplexity" in final else ""
    rows = [
        f"final global adapter: {metric_text(final, task)}{perplexity} on {final['examples']} test examples",
        f"{FLOOR_TITLES[task]} baseline: {metric_text(majority, task)}",
    ]
    for name, curve in summary["baselines"].items():
        rows.append(f"{BASELINE_TITLES[name]}: {metric_text(curve[-1], task)}")
    if summary["dp"]:
        spent = ", ".join(f"{site} ε={eps:.2f}" for site, eps in summary["epsilon"].items() if eps is not None)
        rows.append(f"privacy spent per {summary['unit']} (budget ε={summary['budget']}): {spent or 'none'}")
    else:
        rows.append("privacy: DP was OFF — these updates carry no differential-privacy guarantee")
    rows.append(f"outputs: {summary['out_dir']}/report.html, metrics.jsonl, privacy.json, final/adapter/")
    return "\n".join(rows)


def comparison_text(with_dp: dict[str, Any], without_dp: dict[str, Any] | None = None) -> str:
    """The privacy/utility trade-off side by side: the majority-class floor, the baselines, the federation."""
    columns = TASK_METRICS[with_dp["task"]]
    eps = [v for v in with_dp["epsilon"].values() if v is not None]
    budget = f"ε ≤ {max(eps) if eps else float('nan'):.2f} per {with_dp['unit']} (budget {with_dp['budget']:g})"

    def row(title: str, scores: dict[str, Any], privacy: str) -> str:
        return f"{title:36}" + "".join(f"{scores[key]:>12.3f}" for key, _ in columns) + f"   {privacy}"

    rows = [f"{'':36}" + "".join(f"{name:>12}" for _, name in columns) + "   privacy",
            row(f"{FLOOR_TITLES[with_dp['task']]} (floor)", with_dp["majority"], "-")]
    for name, curve in with_dp["baselines"].items():
        rows.append(row(BASELINE_TITLES[name] + ", DP on", curve[-1], budget))
    if without_dp is not None:
        rows.append(row("federated, DP off", without_dp["final"], "none"))
    rows.append(row("federated, DP on", with_dp["final"], budget))
    return "\n".join(rows)


BASELINE_TITLES = {"local": "each site alone (mean)", "central": "all data pooled (reference)"}


def write_report(out_dir: Path) -> Path:
    """``report.html`` (plots embedded as data URIs, no external resource) and the plots as PNGs beside it."""
    summary = load_summary(out_dir)
    plots = {"utility.png": _utility_plot(summary), "privacy.png": _privacy_plot(summary)}
    images = []
    for name, figure in plots.items():
        if figure is None:
            continue
        figure.savefig(out_dir / name, dpi=150, bbox_inches="tight")
        data = base64.b64encode((out_dir / name).read_bytes()).decode()
        images.append(f'<figure><img alt="{name[:-4]}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{name}</figcaption></figure>")
    path = out_dir / "report.html"
    path.write_text(_html(summary, images), encoding="utf-8")
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    figure, axes = pyplot.subplots(figsize=(6.4, 3.6))
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure, axes


def _utility_plot(summary: dict[str, Any]):
    figure, axes = _figure()
    (second, second_name), (key, name) = TASK_METRICS[summary["task"]]
    rounds = [line["round"] for line in summary["rounds"]]
    axes.plot(rounds, [line["server"][key] for line in summary["rounds"]], "o-", label=f"federation {name}")
    axes.plot(rounds, [line["server"][second] for line in summary["rounds"]], "s--",
              label=f"federation {second_name}")
    for title, curve in summary["baselines"].items():
        axes.plot([p["round"] for p in curve], [p[key] for p in curve], "^:", label=f"{BASELINE_TITLES[title]} {name}")
    axes.axhline(summary["majority"][key], color="grey", lw=1, label=f"{FLOOR_TITLES[summary['task']]} {name}")
    axes.set(xlabel="round", ylabel="server test split", title="Utility per round", ylim=(0, 1))
    axes.legend(fontsize=7)
    return figure


def _privacy_plot(summary: dict[str, Any]):
    if not summary["dp"]:
        return None
    figure, axes = _figure()
    sites = sorted({site for line in summary["rounds"] for site in line.get("epsilon", {})})
    for site in sites:
        points = [(line["round"], line["epsilon"][site]) for line in summary["rounds"]
                  if isinstance(line.get("epsilon", {}).get(site), (int, float))]
        axes.plot([r for r, _ in points], [e for _, e in points], "o-", label=site)
    if summary["budget"]:
        axes.axhline(summary["budget"], color="red", lw=1, ls="--", label=f"budget ε={summary['budget']:g}")
    axes.set(xlabel="round", ylabel=f"ε spent per {summary['unit']}", title="Each site's privacy spend")
    axes.legend(fontsize=7)
    return figure


def _html(summary: dict[str, Any], images: list[str]) -> str:
    e = html.escape
    columns = TASK_METRICS[summary["task"]]
    rows = []
    for line in summary["rounds"][1:]:
        failures = ", ".join(f"{f['site']}: {f['kind']}" for f in line["failures"]) or "-"
        eps = [v for v in line.get("epsilon", {}).values() if isinstance(v, (int, float))]
        rows.append(f"<tr><td>{line['round']}</td><td>{line['contributors']}</td><td>{e(failures)}</td>"
                    + "".join(f"<td>{line['server'][key]:.3f}</td>" for key, _ in columns)
                    + f"<td>{f'{max(eps):.2f}' if eps else '-'}</td>"
                    f"<td>{'yes' if line['model_updated'] else 'no'}</td></tr>")
    samples = "".join(f"<tr><td>{e(s['prompt'])}</td><td>{e(s['reference'])}</td><td>{e(s['generated'])}</td></tr>"
                      for s in summary["final"].get("samples", []))
    examples = (f'<h2>Answers of the final adapter</h2><table id="samples"><tr><th>prompt (end)</th>'
                f"<th>reference</th><th>generated</th></tr>{samples}</table>" if samples else "")
    privacy = (f"DP on: budget ε = {summary['budget']} per {e(summary['unit'])} at every site" if summary["dp"]
               else "<strong>DP was OFF</strong>: the updates carry no differential-privacy guarantee")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedtune report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>fedtune federation report</h1>
<p id="summary">{e(summary_text(summary)).replace(chr(10), '<br>')}</p>
<p id="privacy">{privacy}; aggregation: {e(summary['aggregation'])}.</p>
{''.join(images)}
<h2>Rounds</h2>
<table id="rounds"><tr><th>round</th><th>sites</th><th>failures</th>{''.join(f"<th>{e(n)}</th>" for _, n in columns)}
<th>ε max</th><th>model updated</th></tr>{''.join(rows)}</table>
{examples}
</body></html>
"""
