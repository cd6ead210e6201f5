"""What a user reads: round lines (a progress bar; refusals named, never "DP off" for a DP run), report.html."""

import dataclasses
from pathlib import Path

from common.run_files import (
    BaselinePoint,
    Failure,
    MetricsLine,
    PrivacyFile,
    PrivacyReport,
    RunInfo,
    append_metrics,
    write_baselines,
    write_privacy,
    write_run_info,
)
from simulations.report import comparison_text, load_summary, round_line, write_report

SERVER = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.2, "examples": 30}


def line(round_: int, **fields) -> MetricsLine:
    return dataclasses.replace(MetricsLine(
        round=round_, server=SERVER, aggregation="secure", contributors=3, failures=(), model_updated=True,
        duration_s=12.0, dp=True, privacy_unit="patient_id", epsilon={"site-0": 2.5, "site-1": 3.0}), **fields)


def privacy(dp: bool, **epsilon: float) -> PrivacyFile:
    return PrivacyFile(dp, {site: PrivacyReport(site, dp, eps) for site, eps in epsilon.items()})


def test_a_round_line_has_a_progress_bar_and_names_the_unit():
    text = round_line(line(2), 4)
    assert text.startswith("[██████████··········] round 2/4") and "ε max 3.00 per patient_id" in text


def test_with_hundreds_of_rounds_the_terminal_shows_the_checkpointed_rounds_and_every_failure(capsys):
    import argparse

    from fedtune.cli import report_round

    class Tracker:  # the trackers have tests of their own: here, only that every round still reaches them
        def __init__(self) -> None:
            self.logged: list[int] = []

        def log_round(self, metrics: MetricsLine) -> None:
            self.logged.append(metrics.round)

    tracker, args = Tracker(), argparse.Namespace(rounds=12, task="classification")
    refused = (Failure("site-1", "site-policy", "..."),)
    for n in range(1, 13):  # checkpoint-every 5: rounds 5 and 10 have a checkpoint (and a score) of their own
        kept = f"round-{n - n % 5:04d}"
        report_round(line(n, server={} if n % 5 else SERVER, checkpoint=kept, failures=refused if n == 7 else ()),
                     args, tracker)
    shown = [int(text.split("round ")[1].split("/")[0]) for text in capsys.readouterr().out.splitlines()]
    assert shown == [5, 7, 10, 12] and tracker.logged == list(range(1, 13))


def test_a_dp_round_every_site_refused_says_so_and_never_dp_off():
    refused = tuple(Failure(f"site-{i}", "budget-exhausted", "...") for i in range(3))
    text = round_line(line(3, contributors=0, failures=refused, model_updated=False, epsilon={}), 3)
    assert "DP OFF" not in text and "DP off" not in text
    assert "3 failed (budget-exhausted)" in text and "model unchanged: every site refused" in text
    assert "DP OFF" in round_line(line(1, dp=False, epsilon={}), 3)


def _run_dir(tmp_path: Path, dp: bool = True, baselines: bool = True) -> Path:
    write_run_info(tmp_path, RunInfo(majority_baseline={"accuracy": 0.3, "macro_f1": 0.1}, dp=dp,
                                      aggregation="secure", privacy_unit="column:patient_id",
                                      epsilon_budget=8.0 if dp else None))
    for each in (MetricsLine(0, SERVER), line(1), line(2, failures=(Failure("site-1", "bad-data", "x"),),
                                                       contributors=2)):
        append_metrics(tmp_path, each)
    write_privacy(tmp_path, privacy(dp, **{"site-0": 2.5, "site-1": 3.0}))
    if baselines:
        write_baselines(tmp_path, {"local": [BaselinePoint(1, {"accuracy": 0.2, "macro_f1": 0.15}),
                                             BaselinePoint(2, {"accuracy": 0.25, "macro_f1": 0.2})]})
    return tmp_path


def test_report_html_embeds_both_plots_names_refusals_and_baselines(tmp_path: Path):
    path = write_report(_run_dir(tmp_path))
    page = path.read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert (tmp_path / "utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "privacy.png").is_file()
    assert "site-1: bad-data" in page and "each site alone (mean)" in page and "per patient_id" in page


def test_a_report_without_dp_says_so_and_has_no_privacy_plot(tmp_path: Path):
    page = write_report(_run_dir(tmp_path, dp=False, baselines=False)).read_text()
    assert "DP was OFF" in page and page.count("data:image/png") == 1 and not (tmp_path / "privacy.png").exists()


def test_the_comparison_puts_the_baselines_between_the_floor_and_the_federation(tmp_path: Path):
    text = comparison_text(load_summary(_run_dir(tmp_path)))
    names = [row[:36].strip() for row in text.splitlines()[1:]]
    assert names == ["majority-class (floor)", "each site alone (mean), DP on", "federated, DP on"]
    assert "per patient_id (budget 8)" in text


def test_a_causal_lm_report_shows_its_own_metrics_and_the_final_answers_escaped(tmp_path: Path):
    scores = {"exact_match": 0.6, "rouge_l": 0.7, "loss": 0.9, "perplexity": 2.46, "examples": 10,
              "samples": [{"prompt": "Is <b>this</b> good?", "reference": "yes", "generated": "yes <script>"}]}
    write_run_info(tmp_path, RunInfo(task="causal-lm", majority_baseline={"exact_match": 0.3, "rouge_l": 0.35},
                                      dp=True, aggregation="secure", privacy_unit="record", epsilon_budget=8.0))
    lines = [MetricsLine(0, scores | {"exact_match": 0.1}), line(1, server=scores)]
    for each in lines:
        append_metrics(tmp_path, each)
    write_privacy(tmp_path, privacy(True, **{"site-0": 2.5}))
    page = write_report(tmp_path).read_text()
    assert "exact match" in page and "ROUGE-L" in page and "macro-F1" not in page
    assert "perplexity 2.46" in page and "most-common-answer baseline: exact match 0.300" in page
    assert "yes &lt;script&gt;" in page and "<script>" not in page and "Is &lt;b&gt;this" in page
    assert "exact match 0.600" in round_line(lines[1], 1, "causal-lm")
    table = comparison_text(load_summary(tmp_path))
    assert "exact match" in table.splitlines()[0] and "most-common-answer (floor)" in table


def test_the_report_lists_each_sites_privacy_audit(tmp_path: Path):
    run = _run_dir(tmp_path, baselines=False)
    audited = PrivacyReport("site-0", True, 2.5, audited_epsilon=0.31, audit_canaries=200, audit_guesses=40,
                            audit_correct=27)
    write_privacy(run, PrivacyFile(True, {"site-0": audited, "site-1": PrivacyReport("site-1", True, 3.0)}))
    page = write_report(run).read_text()
    assert "site-0: ε accounted 2.50 — ε audited ≥ 0.31 at 95 % (200 canaries, 40 guesses, 27 correct)" in page
    assert page.count("<li>") == 1  # site-1 has no audit
    assert 'id="audit"' not in write_report(_run_dir(tmp_path / "plain", baselines=False)).read_text()
