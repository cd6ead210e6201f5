"""What a user reads after a simulation: per-round progress, a summary, a DP on/off comparison, and
``report.html`` (self-contained, plots embedded) with the same plots as PNGs beside it for papers."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import TASK_METRICS, unit_name
from common.privacy_audit import audit_line
from common.run_files import (
    METRICS_FILE,
    Baselines,
    MetricsLine,
    PrivacyFile,
    RunFileError,
    RunInfo,
    read_baselines,
    read_metrics,
    read_privacy,
    read_run_info,
)

BAR_WIDTH = 20
FLOOR_TITLES = {"classification": "majority-class", "causal-lm": "most-common-answer"}


def progress_bar(done: int, total: int) -> str:
    filled = round(BAR_WIDTH * done / max(1, total))
    return "[" + "█" * filled + "·" * (BAR_WIDTH - filled) + "]"


def score_text(scores: dict[str, Any], key: str) -> str:
    """A score to 3 decimals; "-" where there is none (no coordinator test set, nothing to divide by)."""
    value = scores.get(key)
    return "-" if value is None else f"{value:.3f}"


def metric_text(scores: dict[str, Any], task: str) -> str:
    """"accuracy 0.512  macro-F1 0.402" (or the causal-lm metrics)."""
    return "  ".join(f"{name} {score_text(scores, key)}" for key, name in TASK_METRICS[task])


def federated_text(line: MetricsLine, task: str) -> str:
    """"  federated accuracy 0.64 [0.55, 0.72]  macro-F1 - (round 2's model)": the sites' noisy evaluation, if any
    ("-": a score the noise leaves undetermined)."""
    federated = line.federated_evaluation
    if federated is None:
        return ""
    shown = []
    for key, name in TASK_METRICS[task]:
        interval = federated.intervals.get(key)
        shown.append(f"{name} {score_text(federated.scores, key)}"
                     + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""))
    return f"  federated {'  '.join(shown)} (round {federated.model_round}'s model)"


def listed(line: MetricsLine, last_round: int) -> bool:
    """Whether a round is listed in the terminal and report.html: its model has a checkpoint of its own (with
    checkpoint-every K, every K-th round), it failed or left the model unchanged, the sites scored it, or it is the
    last; metrics.jsonl keeps every round."""
    return (line.checkpointed() or bool(line.failures) or not line.model_updated
            or line.federated_evaluation is not None or line.round == last_round)


def round_line(line: MetricsLine, rounds: int, task: str = "classification") -> str:
    """One round in the terminal, with a progress bar; says why a round left the model unchanged."""
    server = line.server
    head = f"{progress_bar(line.round, rounds)} round {line.round}/{rounds}"
    if line.round == 0:
        return f"{head}  initial adapter       {metric_text(server, task)}"
    eps = line.spent()
    kinds = sorted({failure.kind for failure in line.failures})
    if line.dp is False:
        privacy = "DP OFF"
    elif eps:
        privacy = f"ε max {max(eps):.2f}" + (f" per {line.privacy_unit}" if line.privacy_unit else "")
    else:
        privacy = "no site spent ε"
    failed = f"  {len(line.failures)} failed ({', '.join(kinds)})" if line.failures else ""
    kept = "" if line.model_updated else (
        f"  (model unchanged: {'every site refused' if not line.contributors else 'too few sites'})")
    return (f"{head}  {line.contributors} site(s){failed}  {metric_text(server, task)}  "
            f"loss {score_text(server, 'loss')}{federated_text(line, task)}  {privacy}  "
            f"[{line.aggregation} aggregation, {line.duration_s:.0f}s]{kept}")


@dataclass(frozen=True)
class Summary:
    """A finished run, from the files it wrote."""

    out_dir: Path
    run: RunInfo
    rounds: list[MetricsLine]
    privacy: PrivacyFile | None
    baselines: Baselines

    @property
    def task(self) -> str:
        return self.run.task

    @property
    def final(self) -> dict[str, Any]:
        """The server's scores of the published model: the last round's, or the one chosen (select-round best)."""
        chosen = self.run.selected_round
        return next((line.server for line in self.rounds if line.round == chosen), self.rounds[-1].server)

    @property
    def epsilon(self) -> dict[str, float | None]:
        """Each site's ε spent, from privacy.json."""
        sites = self.privacy.sites if self.privacy else {}
        return {site: report.epsilon for site, report in sorted(sites.items())}

    @property
    def unit(self) -> str:
        return unit_name(self.run.privacy_unit)


def load_summary(out_dir: Path) -> Summary:
    rounds = read_metrics(out_dir)
    if not rounds:
        raise RunFileError(f"{out_dir / METRICS_FILE} holds no round: the run never evaluated its initial adapter")
    return Summary(out_dir, read_run_info(out_dir), rounds, read_privacy(out_dir), read_baselines(out_dir))


def summary_text(summary: Summary) -> str:
    final, majority, task = summary.final, summary.run.majority_baseline, summary.task
    perplexity = f", perplexity {final['perplexity']:.2f}" if "perplexity" in final else ""
    rows = [f"final global adapter: {metric_text(final, task)}{perplexity} on {final['examples']} test examples"
            if final else "final global adapter: no coordinator test set (the sites' federated evaluation only)"]
    if summary.run.selected_round is not None:
        rows.append(f"final adapter chosen on the federated evaluation: {summary.run.selected_because}")
    if majority:
        rows.append(f"{FLOOR_TITLES[task]} baseline: {metric_text(majority, task)}")
    if federated := [line for line in summary.rounds if line.federated_evaluation is not None]:
        rows.append(f"last federated evaluation:{federated_text(federated[-1], task)}")
    for name, curve in summary.baselines.items():
        rows.append(f"{BASELINE_TITLES[name]}: {metric_text(curve[-1].scores, task)}")
    if summary.run.dp:
        spent = ", ".join(f"{site} ε={eps:.2f}" for site, eps in summary.epsilon.items() if eps is not None)
        rows.append(f"privacy spent per {summary.unit} (budget ε={summary.run.epsilon_budget}): {spent or 'none'}")
    else:
        rows.append("privacy: DP was OFF — these updates carry no differential-privacy guarantee")
    rows.append(f"outputs: {summary.out_dir}/report.html, metrics.jsonl, privacy.json, final/adapter/")
    return "\n".join(rows)


def comparison_text(with_dp: Summary, without_dp: Summary | None = None) -> str:
    """The privacy/utility trade-off side by side: the majority-class floor, the baselines, the federation."""
    columns = TASK_METRICS[with_dp.task]
    eps = [v for v in with_dp.epsilon.values() if v is not None]
    budget = (f"ε ≤ {max(eps) if eps else float('nan'):.2f} per {with_dp.unit} "
              f"(budget {with_dp.run.epsilon_budget or float('nan'):g})")

    def row(title: str, scores: dict[str, Any], privacy: str) -> str:
        return f"{title:36}" + "".join(f"{score_text(scores, key):>12}" for key, _ in columns) + f"   {privacy}"

    rows = [f"{'':36}" + "".join(f"{name:>12}" for _, name in columns) + "   privacy",
            row(f"{FLOOR_TITLES[with_dp.task]} (floor)", with_dp.run.majority_baseline, "-")]
    for name, curve in with_dp.baselines.items():
        rows.append(row(BASELINE_TITLES[name] + ", DP on", curve[-1].scores, budget))
    if without_dp is not None:
        rows.append(row("federated, DP off", without_dp.final, "none"))
    rows.append(row("federated, DP on", with_dp.final, budget))
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


def _utility_plot(summary: Summary):
    figure, axes = _figure()
    (second, second_name), (key, name) = TASK_METRICS[summary.task]
    scored = [line for line in summary.rounds if line.server]  # checkpoint-every K: every K-th round
    rounds = [line.round for line in scored]
    if summary.final:
        axes.plot(rounds, [line.server.get(key, math.nan) for line in scored], "o-", label=f"federation {name}")
        axes.plot(rounds, [line.server.get(second, math.nan) for line in scored], "s--",
                  label=f"federation {second_name}")
    federated = [line.federated_evaluation for line in summary.rounds if line.federated_evaluation is not None]
    for metric, title, style in ((key, name, "D-."), (second, second_name, "v:")):
        points = [(f.model_round, score, f.intervals[metric]) for f in federated
                  if (score := f.scores.get(metric)) is not None and metric in f.intervals]
        if points:  # the sites' noisy evaluation of each round's model, with its 95 % interval
            axes.errorbar([r for r, _, _ in points], [v for _, v, _ in points],
                          yerr=[[v - i[0] for _, v, i in points], [i[1] - v for _, v, i in points]], fmt=style,
                          capsize=3, label=f"federated evaluation {title} (95 % interval)")
    for title, curve in summary.baselines.items():
        axes.plot([p.round for p in curve], [p.scores[key] for p in curve], "^:",
                  label=f"{BASELINE_TITLES[title]} {name}")
    if key in summary.run.majority_baseline:
        axes.axhline(summary.run.majority_baseline[key], color="grey", lw=1,
                     label=f"{FLOOR_TITLES[summary.task]} {name}")
    axes.set(xlabel="round (model after it)", ylabel="score", title="Utility per round", ylim=(0, 1))
    axes.legend(fontsize=7)
    return figure


def _privacy_plot(summary: Summary):
    if not summary.run.dp:
        return None
    figure, axes = _figure()
    sites = sorted({site for line in summary.rounds for site in line.epsilon})
    for site in sites:
        points = [(line.round, eps) for line in summary.rounds if (eps := line.epsilon.get(site)) is not None]
        axes.plot([r for r, _ in points], [e for _, e in points], "o-" if len(points) <= 50 else "-", label=site)
    if budget := summary.run.epsilon_budget:
        axes.axhline(budget, color="red", lw=1, ls="--", label=f"budget ε={budget:g}")
    axes.set(xlabel="round", ylabel=f"ε spent per {summary.unit}", title="Each site's privacy spend")
    axes.legend(fontsize=7)
    return figure


def _html(summary: Summary, images: list[str]) -> str:
    e = html.escape
    columns = TASK_METRICS[summary.task]
    rows = []
    shown = [line for line in summary.rounds[1:] if listed(line, summary.rounds[-1].round)]
    for line in shown:
        failures = ", ".join(f"{f.site}: {f.kind}" for f in line.failures) or "-"
        eps = line.spent()
        rows.append(f"<tr><td>{line.round}</td><td>{line.contributors}</td><td>{e(failures)}</td>"
                    + "".join(f"<td>{score_text(line.server, key)}</td>" for key, _ in columns)
                    + f"<td>{e(federated_text(line, summary.task).strip() or '-')}</td>"
                    + f"<td>{f'{max(eps):.2f}' if eps else '-'}</td>"
                    f"<td>{'yes' if line.model_updated else 'no'}</td></tr>")
    unshown = len(summary.rounds) - 1 - len(shown)
    hidden = (f'<p id="rounds-not-shown">Not shown: {unshown} round(s) that moved the model without a score or a '
              "failure (checkpoint-every); metrics.jsonl has every round.</p>" if unshown else "")
    samples = "".join(f"<tr><td>{e(s['prompt'])}</td><td>{e(s['reference'])}</td><td>{e(s['generated'])}</td></tr>"
                      for s in summary.final.get("samples", []))
    examples = (f'<h2>Answers of the final adapter</h2><table id="samples"><tr><th>prompt (end)</th>'
                f"<th>reference</th><th>generated</th></tr>{samples}</table>" if samples else "")
    privacy = (f"DP on: budget ε = {summary.run.epsilon_budget} per {e(summary.unit)} at every site" if summary.run.dp
               else "<strong>DP was OFF</strong>: the updates carry no differential-privacy guarantee")
    audits = "".join(f"<li>{e(site)}: {e(audit_line(report.epsilon, released))}</li>"
                     for site, report in sorted((summary.privacy.sites if summary.privacy else {}).items())
                     if (released := report.released_audit()))
    audit = ("<h2>Privacy audit</h2><p>Each auditing site's empirical lower bound on its ε (a one-run audit of "
             "gradient canaries only it knows): far below the ε accounted is expected; above it, its DP step is "
             f'broken.</p><ul id="audit">{audits}</ul>' if audits else "")
    shares = "".join(f"<li>{e(site)}: ε = {report.epsilon:g} against the coordinator, ε = "
                     f"{report.own_noise_epsilon:g} from its own noise alone</li>"
                     for site, report in sorted((summary.privacy.sites if summary.privacy else {}).items())
                     if report.own_noise_epsilon is not None and report.epsilon is not None)
    shared = [f for line in summary.rounds if (f := line.federated_evaluation) and f.own_noise_epsilon is not None]
    evaluation = (f'<p id="evaluation-own-noise">The federated evaluations (each site adding a share of their noise '
                  f"too): ε = {shared[-1].epsilon:g} against the coordinator, ε = {shared[-1].own_noise_epsilon:.3g} "
                  "from one site's own noise alone, per unit of a site's evaluation split, over all the planned "
                  "evaluations (an account apart from training's).</p>" if shared else "")
    distributed = ("<h2>Distributed DP</h2><p>Each round was one DP-SGD step of the pooled data, every site adding a "
                   "share of the noise inside secure aggregation. Per site: ε against the coordinator (given secure "
                   "aggregation and the honest sites the site assumes), and ε from its own noise alone (what is left "
                   f'if either fails).</p><ul id="own-noise">{shares}</ul>{evaluation}' if shares else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedtune report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>fedtune federation report</h1>
<p id="summary">{e(summary_text(summary)).replace(chr(10), '<br>')}</p>
<p id="privacy">{privacy}; aggregation: {e(summary.run.aggregation)}.</p>
{''.join(images)}
<h2>Rounds</h2>
<table id="rounds"><tr><th>round</th><th>sites</th><th>failures</th>{''.join(f"<th>{e(n)}</th>" for _, n in columns)}
<th>federated evaluation</th><th>ε max</th><th>model updated</th></tr>{''.join(rows)}</table>
{hidden}
{distributed}
{audit}
{examples}
</body></html>
"""
