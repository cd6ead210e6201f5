"""End to end on Flower's real simulation engine, through the `fedtune` CLI, with the real MiniLM.

3 sites, 2 rounds, DP on per condition (a per-person privacy unit), secure aggregation (the
default), tiny data (real drug reviews, 16 tokens each), with both baselines and report.html opened
in headless Chromium; then an interrupted run in distributed DP mode (the server takes each DP-SGD step
with Adam), Ctrl-C'd and resumed. What happens between the round loop and the sites' ClientApp in a round
(re-runs, spent ledgers, quantisation) is tested in process, without Flower's engine, in
tests/test_federation_inprocess.py. Slow: about 3 minutes.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.run_files import (
    PRIVACY_FILE,
    MetricsLine,
    RoundInfo,
    read_metrics,
    read_privacy,
    read_round_info,
    read_run_info,
)
from tests.conftest import write_csv
from tests.processes import ProcessFamily, described

pytestmark = [pytest.mark.slow, pytest.mark.process]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


def fedtune(*args: str, timeout: int = 1800, family: ProcessFamily | None = None) -> subprocess.CompletedProcess:
    """The command's result (``timeout``: a safety net against a hang); with ``family``, every process it
    started is recorded there while it runs."""
    return (family or ProcessFamily()).run(command(*args), timeout)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, drug_reviews):
    root = tmp_path_factory.mktemp("e2e")
    train = write_csv(root / "train.csv", drug_reviews[:60])
    test = write_csv(root / "test.csv", drug_reviews[500:530])
    out = root / "run"
    family = ProcessFamily()
    args = ["--sites", "3", "--rounds", "2", "--epsilon", "8", "--data", str(train), "--test-data", str(test),
            "--partition", "iid", "--max-length", "16", "--local-epochs", "1", "--batch-size", "8",
            "--privacy-unit", "column:condition", "--audit-canaries", "20"]
    tracking = ["--mlflow", f"sqlite:///{root / 'mlflow.db'}", "--tensorboard", str(root / "tb")]
    done = fedtune("simulate", "--out", str(out), *args, "--baselines", "local,central", *tracking, family=family)
    yield {"out": out, "done": done, "family": family, "args": args, "root": root}
    family.stop()


def _metrics(out: Path) -> list[MetricsLine]:
    return read_metrics(out)


def test_simulation_completes_and_writes_its_outputs(federation):
    done, out = federation["done"], federation["out"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 2/2" in done.stdout and "majority-class baseline" in done.stdout
    assert "secure aggregation" in done.stdout and "DP ε=8 per condition" in done.stdout
    round_one = next(line for line in done.stdout.splitlines() if "round 1/2" in line)
    assert "ε max" in round_one and "per condition" in round_one
    assert "privacy spent per condition" in done.stdout and "report.html" in done.stdout
    lines = _metrics(out)
    assert [line.round for line in lines] == [0, 1, 2]
    assert all(line.contributors == 3 and line.model_updated for line in lines[1:])
    written = (out / "metrics.jsonl").read_text()
    assert "train_loss" not in written  # nothing computed on the sites' records leaves them outside DP ...
    for line in lines[1:]:  # ... but their noisy evaluation counts, summed in the secure round
        federated = line.federated_evaluation
        assert federated is not None and federated.sites == 3 and federated.noise_sigma > 0, line
        assert federated.model_round == line.round - 1 and federated.epsilon == 1.0
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()


def test_the_run_is_logged_to_mlflow_and_tensorboard_and_neither_prints_to_the_terminal(federation):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done, root = federation["done"], federation["root"]
    assert done.returncode == 0 and "mlflow" not in (done.stdout + done.stderr).lower()
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedtune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["federation.rounds"] == "2"
    accuracy = sorted(client.get_metric_history(run.info.run_id, "server/accuracy"), key=lambda m: m.step)
    assert [m.value for m in accuracy] == [line.server["accuracy"] for line in _metrics(federation["out"])]
    for site in ("site-0", "site-1", "site-2"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, f"epsilon/{site}")) == [1, 2]
    assert {"adapter", "passport.json", "run"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    events = EventAccumulator(str(root / "tb" / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("server/accuracy")] == [0, 1, 2]
    assert {f"epsilon/site-{i}" for i in range(3)} <= set(events.Tags()["scalars"])


def test_secure_aggregation_is_the_default_and_only_sums_are_seen(federation):
    out = federation["out"]
    for line in _metrics(out)[1:]:
        assert line.aggregation == "secure"
        secure = line.secure_aggregation
        assert secure.survivors == ["site-0", "site-1", "site-2"] and secure.dropped == []
        values = read_run_info(out).update_values
        assert secure.upload_bytes <= 1.1 * 4 * values
    for site in ("site-0", "site-1", "site-2"):
        secrets = [out / "sites" / site / "identity.pem", *(out / "sites" / site / "secagg-sessions").iterdir()]
        assert all(path.stat().st_mode & 0o077 == 0 for path in secrets)  # owner-only


def test_every_site_spent_at_most_its_budget(federation):
    privacy = read_privacy(federation["out"])
    assert privacy.dp is True and sorted(privacy.sites) == ["site-0", "site-1", "site-2"]
    for report in privacy.sites.values():
        assert 0 < report.epsilon <= 8.0
        assert report.budget == 8.0 and report.delta == 1e-5 and report.unit == "condition"
    # σ, the sampling rate and the step count would pin a site's record count: never written to the file.
    written = json.loads((federation["out"] / PRIVACY_FILE).read_text())["sites"].values()
    audit = {"audited_epsilon", "audit_canaries", "audit_guesses", "audit_correct"}  # every site audits (round 2 on)
    assert all(set(report) == {"site", "dp", "epsilon", "delta", "budget", "accountant", "unit", "resent",
                               "own_noise_epsilon", *audit}
               and report["own_noise_epsilon"] is None  # local DP: a site's own noise is all of it
               and report["audit_canaries"] == 20 and 0 <= report["audited_epsilon"] <= report["epsilon"]
               for report in written)


LIBRARY_WARNING = re.compile(r"\w+Warning: |warnings\.warn\(")
"""A line Python's warnings module prints (``file.py:12: FutureWarning: ...``): never a sentence of ours."""


def test_no_library_warning_reaches_the_terminal(federation):
    """The run trains in this command too (the baselines, as `fedtune demo`); Flower's processes log to files."""
    done = federation["done"]
    assert done.returncode == 0
    leaked = [line for line in (done.stdout + done.stderr).splitlines() if LIBRARY_WARNING.search(line)]
    assert not leaked, "library warnings on the terminal:\n" + "\n".join(leaked)


def test_report_opens_in_a_headless_browser_with_its_plots_and_baselines(federation, tmp_path: Path):
    """report.html is self-contained (no network, no file beside it needed): Chromium renders its plots."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: `make browser` installs it (CI does)")
    out = federation["out"]
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", page)  # a PNG's base64 may spell "http"
    assert "http" not in text.replace("http-equiv", ""), "report.html names a URL: it must need no network"
    assert "each site alone (mean)" in page and "all data pooled (reference)" in page
    assert (out / "utility.png").stat().st_size > 10_000 and (out / "privacy.png").stat().st_size > 10_000
    alone = tmp_path / "report.html"
    alone.write_text(page)  # moved away from its PNGs: it must still show them

    def render(html_file: Path) -> Image.Image:
        shot = tmp_path / f"{html_file.stem}.png"
        done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--screenshot={shot}", "--window-size=1000,1400", html_file.as_uri()],
                              capture_output=True, text=True, timeout=120)
        assert shot.is_file(), done.stderr[-2000:]
        return Image.open(shot).convert("RGB")

    from PIL import Image

    # What the browser shows, not only what the file holds: the federated column and each site's audit.
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", alone.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    audit_list = re.search(r'<ul id="audit">(.*?)</ul>', dom, re.S)
    assert audit_list and sorted(re.findall(r"<li>(site-\d):", audit_list.group(1))) == ["site-0", "site-1", "site-2"]
    rounds = re.search(r'<table id="rounds">(.*?)</table>', dom, re.S)
    assert rounds and rounds.group(1).count("federated accuracy") == 2  # rounds 1 and 2: the models of rounds 0, 1
    shown = render(alone)
    blank = tmp_path / "no-plots.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', page))  # control: the same page, no plots
    # Matplotlib's first line colour (#1f77b4) covers many pixels only where the plots rendered.
    blue = lambda image: sum(1 for pixel in image.get_flattened_data() if abs(pixel[0] - 31) + abs(pixel[1] - 119)  # noqa: E731
                             + abs(pixel[2] - 180) < 40)
    assert blue(shown) > 500 and blue(render(blank)) < 50


def test_final_adapter_loads_with_plain_peft_and_predicts_as_the_federation_scored_it(federation):
    from peft import PeftModel
    from safetensors.numpy import load_file

    from common.adapter import set_adapter_state
    from common.config import LoraSettings
    from common.model import base_model, build_model, load_tokenizer

    out = federation["out"]
    tokenizer = load_tokenizer("")
    batch = tokenizer(["This drug made me feel awful.", "Works great, no side effects."], return_tensors="pt",
                      padding=True)

    def logits(model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return model.eval()(**batch).logits.numpy()

    def exported(adapter: Path) -> np.ndarray:
        return logits(PeftModel.from_pretrained(base_model("", num_labels=3), str(adapter)))

    final = out / "final" / "adapter"
    assert not np.allclose(exported(out / "checkpoints" / "round-0000"), exported(final), atol=1e-4)
    trained = build_model("", 3, LoraSettings())
    set_adapter_state(trained, load_file(final / "adapter_model.safetensors"))
    assert np.allclose(exported(final), logits(trained), atol=1e-5)  # the model the server scored, exactly


def test_an_llm_federation_runs_from_the_cli_and_its_adapter_generates_text(tmp_path: Path):
    """`fedtune simulate --task causal-lm --model smollm2`: instruction tuning of the packaged SmolLM2 on Flower's
    engine, with DP and secure aggregation (sites: prompt/response CSV; the server: chat-messages JSONL); the final
    adapter is an ordinary PEFT adapter that loads on the base model and answers."""
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from common.data import read_records
    from common.model import load_tokenizer, resolve_model_path

    chats = read_records("drugreview", task="causal-lm")
    train, test = write_csv(tmp_path / "train.csv", chats[:30]), tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"messages": [{"role": "user", "content": row["prompt"]},  # the chat format
                                                     {"role": "assistant", "content": row["response"]}]}) + "\n"
                            for row in chats[500:506]))
    out = tmp_path / "llm"
    done = fedtune("simulate", "--out", str(out), "--task", "causal-lm", "--model", "smollm2", "--sites", "3",
                   "--rounds", "2", "--data", str(train), "--test-data", str(test), "--partition", "iid",
                   "--max-length", "48", "--local-epochs", "1", "--batch-size", "8", "--test-examples", "6")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 2/2" in done.stdout and "exact match" in done.stdout and "DP ε=8 per record" in done.stdout
    assert "most-common-answer baseline" in done.stdout and "secure aggregation" in done.stdout
    lines = _metrics(out)
    assert [line.round for line in lines] == [0, 1, 2]
    assert all(line.contributors == 3 and line.model_updated and not line.failures for line in lines[1:])
    server = lines[-1].server
    assert server["examples"] == 6 and 0 <= server["exact_match"] <= 1 and 0 <= server["rouge_l"] <= 1
    assert server["perplexity"] > 1 and len(server["samples"]) == 3
    assert server["samples"][0]["prompt"].startswith("Drug review:")  # the question itself, not the chat template
    assert server["loss"] != lines[0].server["loss"]  # the adapter changed what the model says
    assert all(0 < report.epsilon <= 8.0 for report in read_privacy(out).sites.values())
    assert "Answers of the final adapter" in (out / "report.html").read_text()

    final = out / "final" / "adapter"
    assert (final / "passport.json").is_file()
    tokenizer = load_tokenizer("smollm2")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2")),
                                      str(final)).eval()
    saved = load_file(final / "adapter_model.safetensors")  # the adapter PEFT loaded is the one the run saved
    b_key = next(key for key in saved if "lora_B" in key)
    loaded = dict(model.named_parameters())[b_key.replace(".weight", ".default.weight")]
    assert np.abs(saved[b_key]).max() > 0 and np.array_equal(loaded.detach().numpy(), saved[b_key])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": chats[510]["prompt"]}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_no_flower_process_outlives_the_command(federation):
    """The SuperLink, flwr-simulation and Ray's processes the command started (recorded while it ran) are gone."""
    family = federation["family"]
    assert len(family.seen) > 3, described(list(family.seen.values()))
    assert described(family.alive()) == []


def _lineage(out: Path) -> list[RoundInfo]:
    """round.json of every checkpoint, oldest first, each checked to name its parent's checksum."""
    infos = [read_round_info(p) for p in sorted((out / "checkpoints").glob("round-*"))]
    for parent, child in itertools.pairwise(infos):
        assert child.parent_sha256 == parent.adapter_sha256, (parent.round, child.round)
    return infos


def test_passport_audit_and_lineage(federation, tmp_path: Path):
    out = federation["out"]
    key = str(out / "passport-signing.pub")
    ok = fedtune("passport", "verify", str(out / "final" / "adapter"), "--key", key)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "per condition" in ok.stdout  # the passport names whom ε protects
    tampered = tmp_path / "adapter"
    shutil.copytree(out / "final" / "adapter", tampered)
    weights = tampered / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
    bad = fedtune("passport", "verify", str(tampered), "--key", key)
    assert bad.returncode == 1 and "adapter file changed" in bad.stdout + bad.stderr

    from common.audit import verify_chain

    assert verify_chain(out / "audit.jsonl") >= 5
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert events[:5] == ["run-started", "round", "checkpoint", "round", "checkpoint"]
    assert [info.round for info in _lineage(out)] == [0, 1, 2]


def test_bad_input_exits_2_before_starting_anything(tmp_path: Path):
    missing = fedtune("simulate", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none.csv"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = fedtune("simulate", "--out", str(tmp_path / "x"), "--epsilon", "-3")
    assert bad.returncode == 2 and "privacy.epsilon must be a positive number" in bad.stderr
    reviews = write_csv(tmp_path / "r.csv", [{"text": "fine", "label": "positive"}] * 4)
    no_test = fedtune("simulate", "--out", str(tmp_path / "x"), "--data", str(reviews), "--sites", "2")
    assert no_test.returncode == 2 and "data.test-source must name the server's test file" in no_test.stderr


def test_ctrl_c_stops_everything_and_resume_completes_the_run(tmp_path: Path, drug_reviews, started_processes):
    """In distributed DP mode (issue 21): one DP-SGD step of the pooled data per round, on Flower's engine."""
    train = write_csv(tmp_path / "train.csv", drug_reviews[:30])
    out = tmp_path / "run"
    args = ["simulate", "--out", str(out), "--data", str(train), "--test-data", str(train), "--partition", "iid",
            "--max-length", "16", "--rounds", "3", "--dp-mode", "distributed"]
    with open(tmp_path / "stderr.log", "wb") as errors:  # a file: an unread pipe could fill and block the run
        proc = started_processes.start(command(*args), stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.monotonic() + 1800  # a safety net: the wait is for round 1's checkpoint
    while proc.poll() is None and not (out / "checkpoints" / "round-0001").exists():
        assert time.monotonic() < deadline, "no round-1 checkpoint"
        started_processes.snapshot()
        time.sleep(0.2)  # interrupt once round 1 is checkpointed, mid-run
    started_processes.snapshot()
    proc.send_signal(signal.SIGINT)
    started_processes.wait(proc, 600)
    stderr = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 130 and "every process it started was stopped" in stderr, stderr[-3000:]
    assert len(started_processes.seen) > 1 and described(started_processes.alive()) == []

    resumed = fedtune(*args, "--resume", family=started_processes)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    lines = _metrics(out)
    assert lines[-1].round == 3 and sorted({line.round for line in lines}) == [0, 1, 2, 3]
    lineage = _lineage(out)  # every checkpoint names its parent: no gap, no fork
    assert all((out / "checkpoints" / f"round-{info.round:04d}" / "server_optimizer.safetensors").is_file()
               for info in lineage[1:])  # the server's Adam moments travel with each checkpoint into the resume
    assert lineage[-1].round == max(line.round for line in lines if line.model_updated)
    for line in lines[1:]:
        if line.model_updated:  # the sites' ring sum: integers mod 2^b, no rounding error of a fixed-point sum
            assert line.secure_aggregation.error_bound == 0.0 and line.secure_aggregation.modulus_bits > 0
            scored = line.federated_evaluation  # and the sites' noisy counts of the model they received, in the ring
            assert scored is not None and scored.sites == line.contributors and scored.model_round == line.round - 1
    reports = read_privacy(out).sites
    assert len(reports) == 3 and all(r.accountant == "skellam-rdp" for r in reports.values())
    for report in reports.values():  # both numbers: against the coordinator, and from the site's own noise alone
        assert 0 < report.epsilon <= 8.0 + 1e-9 and report.own_noise_epsilon > report.epsilon
    # A round the interrupt cut short was paid for in ε by the sites that trained it; re-running it
    # spends again, so a site may reach its budget before the last round. That refusal is the ledger
    # doing its job (a typed failure), never a crash.
    for line in lines[-3:]:
        if line.round and not line.model_updated:
            kinds = {failure.kind for failure in line.failures}
            assert "budget-exhausted" in kinds and kinds <= {"budget-exhausted", "round-aborted"}, line.failures
    assert described(started_processes.alive()) == []
