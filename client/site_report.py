"""The site's own report: how each federated model does on this site's evaluation split, round by round.

Written to ``site-report.html`` in the site's state directory (owner-only) from its ``site-eval.jsonl``
after every evaluation. The numbers are un-noised and never leave the site: they are for the site's own
staff (is the federation's model good for our patients?), not for the coordinator.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from common.files import write_private

SITE_REPORT_FILE = "site-report.html"
COLUMNS = {"classification": ("accuracy", "macro_f1"), "causal-lm": ("loss", "exact_match", "rouge_l")}
"""The scores shown per task, the first one plotted."""


def own_scores(scores_file: Path) -> list[dict[str, Any]]:
    """The site's score lines (an unreadable line is skipped: the report is a view, the JSON lines the record)."""
    lines = []
    for text in scores_file.read_text(encoding="utf-8").splitlines() if scores_file.exists() else []:
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("round"), int):
            lines.append(entry)
    return lines


def _plot(points: list[tuple[int, float]], name: str) -> str:
    """An inline SVG line of ``name`` against the round (no plotting library at a site)."""
    if not points:
        return ""
    width, height, pad = 480, 200, 30
    rounds = [r for r, _ in points]
    values = [v for _, v in points]
    low, high = min(values), max(values)
    span_x, span_y = max(max(rounds) - min(rounds), 1), max(high - low, 1e-9)

    xy = [(pad + (r - min(rounds)) / span_x * (width - 2 * pad), height - pad - (v - low) / span_y * (height - 2 * pad))
          for r, v in points]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in xy)
    return (f'<svg id="curve" width="{width}" height="{height}" role="img" aria-label="{html.escape(name)} by round">'
            f'<polyline fill="none" stroke="black" points="{path}"/>{dots}'
            f'<text x="{pad}" y="15">{html.escape(name)}: {low:.3f} to {high:.3f}, rounds {min(rounds)}-{max(rounds)}'
            f'</text></svg>')


def write_site_report(state_dir: Path, site: str, task: str, scores_file: Path) -> Path:
    """Rewrite the site's report from its score lines; its path."""
    columns = COLUMNS.get(task, COLUMNS["classification"])
    lines = own_scores(scores_file)

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))

    rows = "".join(
        f"<tr><td>{entry.get('run_id', '')}</td><td>{entry['round']}</td><td>{cell(entry.get('model_round', ''))}</td>"
        f"<td>{cell(entry.get('examples', ''))}</td>"
        + "".join(f"<td>{cell(entry.get(name, ''))}</td>" for name in columns) + "</tr>"
        for entry in lines)
    points = [(entry["round"], float(entry[columns[0]])) for entry in lines
              if isinstance(entry.get(columns[0]), (int, float))]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedtune: {html.escape(site)}'s own evaluation</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head>
<body><h1>{html.escape(site)}: the federated models on this site's own evaluation split</h1>
<p id="private">These scores are exact (no noise) and never leave this site: the coordinator only receives
noisy counts inside the secure sum. Each row is the model this site received in that round.</p>
{_plot(points, columns[0])}
<table id="scores"><tr><th>run</th><th>round</th><th>model of round</th><th>examples</th>
{''.join(f"<th>{html.escape(name)}</th>" for name in columns)}</tr>{rows}</table>
</body></html>
"""
    path = state_dir / SITE_REPORT_FILE
    write_private(path, page.encode("utf-8"))
    return path
