"""``fedtune``: the command line. Each subcommand parses, validates, then calls one function.

    fedtune simulate | demo            a federation on this machine (simulations/)
    fedtune site keygen | members | pin-members, provision, passport
                                       site keys, deployment kits, model passports (fedtune/deploy_cli.py)


Exit codes: 0 done, 1 the run failed, 2 bad input (config, data, model), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.library_noise import silence_library_noise
from common.typed import BadInput, ConfigError
from fedtune.command import Command
from fedtune.deploy_cli import DEPLOYMENT_COMMANDS
from fedtune.runtime.project import RunFailed, project_dir

if TYPE_CHECKING:
    from common.config import CommandLineOption, TaskKind
    from common.run_files import MetricsLine
    from fedtune.runtime.tracking import RunTracker
    from simulations.report import Summary

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
FLOWER_COMMANDS = frozenset({"simulate", "demo", "server", "client"})
"""The commands that run Flower: the installed release is checked before they start any process."""
# Each command imports what its options and its run need (common.config's settings, client.policy, the
# registry's codecs) only when it is the one run: `fedtune passport verify`, `site members` and every
# `--help` stay light (tests/test_cli_light.py).


def default_run_config() -> dict[str, Any]:
    import tomllib

    from flwr.common.config import flatten_dict

    with open(project_dir() / "pyproject.toml", "rb") as handle:
        return flatten_dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def warn(message: str) -> None:
    print(f"\n!!! WARNING: {message} !!!\n", file=sys.stderr, flush=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where X says something (not '' or None) and the help does not already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == ""
        if quiet or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action) or text


def _federation_options(p: argparse.ArgumentParser, *, simulation: bool) -> None:
    """The run's settings as options: flag, default and help from their ``option(...)`` fields in
    common/config.py (the one source); then the switches that are not one setting each."""
    from common.config import command_line_options

    for opt in command_line_options():
        if simulation or not opt.simulation_only:
            p.add_argument(opt.flag, dest=opt.dest, type=opt.kind, default=opt.cli_default, help=opt.help,
                           choices=opt.choices or None)
    p.add_argument("--plain-lora-averaging", action="store_true",
                   help="train and average A and B separately (inexact) instead of FFA-LoRA")
    p.add_argument("--plain-aggregation", action="store_true",
                   help="let the server see each site's update (no secure aggregation; warns)")
    if simulation:
        p.add_argument("--cpus-per-site", type=int, default=1,
                       help="CPU cores each simulated site reserves (1: as many sites train at once as there are "
                            "cores)")


def simulated_registry(out: Path, sites: int) -> Path:
    """Identity keys for the simulated sites (each in its own state dir), their registry, and each site's
    pinned member list (the person running the simulation is every site's officer, so confirms the list).

    Kept across re-runs into the same directory, like a real site keeps its keys.
    """
    from common.registry import RegistryError, create_site_identities, load_registry, pin_members

    names = [f"site-{i}" for i in range(sites)]
    path = out.resolve() / "registry.json"
    try:
        current = sorted(load_registry(path).ids) == sorted(names)
    except RegistryError:
        current = False
    if not current:
        create_site_identities(names, {name: out.resolve() / "sites" / name for name in names}, path)
    digest = load_registry(path).digest.hex()
    for name in names:
        pin_members(path, out.resolve() / "sites" / name, digest)
    return path


def simulated_site_policies(out: Path, sites: int, *, task: TaskKind, labels: str, model: str, dp: bool,
                            secure: bool, epsilon: float, unit: str, max_rows_per_unit: int = 8,
                            audit_canaries: int = 0, eval_epsilon: float = 1.0, dp_mode: str = "local") -> None:
    """Each simulated site's own policy file (the person running the simulation plays every site): it accepts the
    run's DP mode (asking for distributed DP by name is the sites' opt-in).

    Weaker protection than the defaults exists only because this command was asked for it by name.
    """
    from client.policy import SitePolicy, write_policy

    policy = SitePolicy(task=task, labels=tuple(filter(None, labels.split(","))), model_path=model,
                        max_epsilon=epsilon, require_dp=dp, max_eval_epsilon=eval_epsilon,
                        require_secure_aggregation=secure, privacy_unit=unit, max_rows_per_unit=max_rows_per_unit,
                        audit_canaries=audit_canaries, dp_modes=tuple(dict.fromkeys(("local", dp_mode))))
    for i in range(sites):
        write_policy(out.resolve() / "sites" / f"site-{i}", policy)


def simulated_passport_key(out: Path) -> Path:
    """The simulated coordinator's passport signing key (kept across re-runs), and its public half beside it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.files import write_private
    from common.passport import public_key_pem, signing_key_pem

    path = out.resolve() / "passport-signing.key"
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        write_private(path, signing_key_pem(key))
        path.with_suffix(".pub").write_bytes(public_key_pem(key.public_key()))
    return path


def resume_checkpoint(out: Path) -> str:
    from common.run_files import latest_checkpoint

    found = latest_checkpoint(out.resolve())
    if found is None:
        raise ConfigError(f"--resume: no checkpoint in {out}/checkpoints to continue from")
    return str(found)


def training_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run config from the parsed options (every way of running shares them)."""
    from common.config import command_line_options

    return {opt.key: getattr(args, opt.dest) for opt in command_line_options() if hasattr(args, opt.dest)} | {
        "lora.alpha": 2 * args.lora_rank,
        "lora.aggregation": "plain" if args.plain_lora_averaging else "ffa",
        "federation.min-sites": max(1, min(2, args.sites)),
        "federation.secure-aggregation": not args.plain_aggregation,
    }


def simulate_run_config(args: argparse.Namespace, out: Path, *, dp: bool) -> dict[str, Any]:
    secure = not args.plain_aggregation
    return training_run_config(args) | {
        "out-dir": str(out.resolve()),
        "resume-from": resume_checkpoint(out) if getattr(args, "resume", False) else "",
        "passport-key": str(simulated_passport_key(out)),
        "privacy.enabled": dp,
        "secagg.registry": str(simulated_registry(out, args.sites)) if secure else "",
    }


def simulate_once(args: argparse.Namespace, out: Path, *, dp: bool, title: str) -> Summary:
    """Validate, run one federation, print its rounds and summary; its summary."""
    from common.config import RunSettings, unit_column, unit_name
    from common.data import label_names, partition, read_records, test_source, unit_indices

    run_config = simulate_run_config(args, out, dp=dp)
    settings = RunSettings.from_flat(default_run_config() | run_config)
    parse_baselines(getattr(args, "baselines", ""))
    task = settings.task
    records = read_records(settings.data.source, task=task)  # fail fast, before any process starts
    unit_indices(records, unit_column(settings.privacy.unit), settings.data.source)
    if (test := test_source(settings.data)) is not None:
        read_records(test, split="test", task=task)
    elif parse_baselines(getattr(args, "baselines", "")):
        raise ConfigError("--baselines are scored on the coordinator's test set: give --test-data (not 'none')")
    run_config["data.labels"] = ",".join(label_names(records, settings.data.labels)) if task == "classification" else ""
    sizes = [len(p) for p in partition(records, args.sites, settings.data.partition,
                                       alpha=settings.data.dirichlet_alpha, seed=settings.data.seed)]
    if not args.plain_aggregation and args.sites < 3:
        raise ConfigError(f"secure aggregation needs at least 3 sites (got --sites {args.sites}): with two, each "
                          "site could subtract its own update from the sum and read the other's. Use --sites 3 "
                          "or more, or --plain-aggregation")
    simulated_site_policies(out, args.sites, task=task, labels=run_config["data.labels"], model=args.model, dp=dp,
                            secure=not args.plain_aggregation, epsilon=args.epsilon, unit=args.privacy_unit,
                            max_rows_per_unit=settings.train.max_rows_per_unit,
                            audit_canaries=getattr(args, "audit_canaries", 0),
                            eval_epsilon=settings.federation.eval_epsilon, dp_mode=settings.privacy.dp_mode)
    if not args.plain_aggregation:
        from common.registry import load_registry, read_aloud

        digest = read_aloud(load_registry(run_config["secagg.registry"]).digest)
        print(f"== playing every site's officer: pinned the {args.sites} members (digest {digest[:19]}…) in each "
              "simulated site's state dir", flush=True)
    if not dp:
        warn("differential privacy is OFF for this run: site updates carry no DP guarantee")
    if args.plain_aggregation:
        warn("secure aggregation is OFF (--plain-aggregation): the server sees every site's update")
    aggregation = "plain aggregation (server sees updates)" if args.plain_aggregation else "secure aggregation"
    from simulations.report import load_summary, summary_text, write_report  # once the input is checked
    from simulations.runner import run_simulation
    print(f"== {title}: {args.sites} sites (examples per site: {sizes}), {args.rounds} rounds, "
          f"{f'DP ε={args.epsilon:g} per {unit_name(args.privacy_unit)}' if dp else 'DP OFF'}, {aggregation}, "
          f"out {out}", flush=True)
    with run_tracker(args, out.resolve().name) as tracker:
        tracker.log_settings(run_config)
        run_simulation(run_config, sites=args.sites, cpus_per_site=args.cpus_per_site, out_dir=out,
                       on_round=lambda line: report_round(line, args, tracker))
        tracker.log_outputs(out)
    baselines = parse_baselines(getattr(args, "baselines", ""))
    if baselines:
        from common.run_files import write_baselines
        from simulations.baselines import run_baselines

        print(f"== baselines ({', '.join(baselines)}): the same plan, DP setting and rounds, trained here", flush=True)
        final = RunSettings.from_flat(default_run_config() | run_config)
        write_baselines(out, run_baselines(baselines, final, on_round=lambda text: print("  " + text, flush=True)))
    report = write_report(out)
    summary = load_summary(out)
    print(summary_text(summary), flush=True)
    print(f"report: {report}", flush=True)
    return summary


def run_tracker(args: argparse.Namespace, run_name: str, *, ready: Callable[[], bool] | None = None) -> RunTracker:
    """The run's tracking and monitoring as asked for (--mlflow, --tensorboard, --metrics-port), opened now, before
    any process starts: a bad URI or a port in use is bad input."""
    from fedtune.runtime.tracking import Tracker, open_trackers

    openers: list[Callable[[], Tracker]] = []
    if getattr(args, "metrics_port", None) is not None and ready is not None:
        from fedtune.runtime.monitoring import CoordinatorMetrics

        openers.append(lambda: CoordinatorMetrics(host=args.metrics_host, port=args.metrics_port, ready=ready))
    return open_trackers(mlflow_uri=getattr(args, "mlflow", None), tensorboard_dir=getattr(args, "tensorboard", None),
                         run_name=run_name, openers=openers)


def report_round(line: MetricsLine, args: argparse.Namespace, tracker: RunTracker) -> None:
    from simulations.report import listed, round_line

    if listed(line, args.rounds):
        print("  " + round_line(line, args.rounds, args.task), flush=True)
    tracker.log_round(line)


def parse_baselines(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(chosen) - {"local", "central"})
    if unknown:
        raise ConfigError(f"--baselines: unknown {unknown}; choose from local, central (comma-separated)")
    return chosen


def cmd_simulate(args: argparse.Namespace) -> None:
    simulate_once(args, args.out, dp=not args.no_dp, title="simulation")


def cmd_demo(args: argparse.Namespace) -> None:
    """A consortium of banks on BANKING77 intents, DP on, against each bank alone and the majority class."""
    from simulations.demo import prepare_bank_data
    from simulations.report import comparison_text

    args.data, args.test_data, intents = prepare_bank_data(args.banking77, args.out / "data", args.intents)
    args.baselines = "local"
    with_dp = simulate_once(args, args.out / "dp-on", dp=True,
                            title=f"{args.sites} banks, {intents} intents, WITH DP (ε={args.epsilon:g} per record)")
    print(f"\n== privacy / utility on the BANKING77 test queries of those {intents} intents\n"
          + comparison_text(with_dp))


def cmd_server_start(args: argparse.Namespace) -> None:
    """The coordinator: SuperLink with TLS + site auth, the fedtune run, streamed rounds."""
    from common.config import NO_TEST_DATA, RunSettings
    from common.data import label_names, read_records
    from fedtune.runtime.monitoring import superlink_ready
    from fedtune.runtime.orchestrator import ServerKit, start_server

    if not args.test_data or args.test_data == NO_TEST_DATA:  # the sites' federated evaluation only
        if args.task == "classification" and not args.labels:
            raise ConfigError("--labels: with no --test-data the coordinator reads no labels from records; list the "
                              "federation's labels, comma-separated")
        args.test_data = NO_TEST_DATA
    kit = ServerKit.load(args.kit)
    labels = args.labels or (",".join(label_names(read_records(args.test_data))) if args.task == "classification"
                             else "")
    run_config = training_run_config(args) | {"data.labels": labels, "privacy.enabled": True}
    if args.plain_aggregation:
        warn("secure aggregation is OFF (--plain-aggregation): the server sees every site's update")
    RunSettings.from_flat(default_run_config() | run_config | {"secagg.registry": str(kit.registry)})
    if args.metrics_port == args.port and args.metrics_host in (args.host, "0.0.0.0"):
        raise ConfigError(f"--metrics-port {args.metrics_port} is the SuperLink's --port: choose another")
    print(f"== coordinator on {args.host}:{args.port} (TLS, site authentication), {len(kit.supernode_keys)} "
          f"registered sites, state {args.state}{', resuming' if args.resume else ''}", flush=True)
    ready = superlink_ready(f"https://{args.host}:{args.port}/health", str(kit.ca))
    with run_tracker(args, args.state.resolve().name, ready=ready) as tracker:
        tracker.log_settings(run_config)
        start_server(kit, args.state, host=args.host, port=args.port, run_config=run_config, resume=args.resume,
                     on_round=lambda line: report_round(line, args, tracker))
        tracker.log_outputs(args.state / "run")
    print(f"final adapter: {args.state / 'run' / 'final' / 'adapter'} (signed passport inside); "
          f"audit log: {args.state / 'run' / 'audit.jsonl'}")


def site_policy_options() -> tuple[CommandLineOption, ...]:
    from client.policy import SitePolicy
    from common.config import options_of

    return options_of(SitePolicy)


def cmd_client_start(args: argparse.Namespace) -> int:
    """The on-premise site daemon (a SuperNode and the site's executor); runs until stopped."""
    from client.policy import SitePolicy
    from common.config import model_name, unit_name
    from fedtune.runtime.daemon import start_client

    policy = SitePolicy.from_mapping({opt.key: getattr(args, opt.dest) for opt in site_policy_options()},
                                     "the command line")
    policy.check_complete()
    print(f"== site daemon: kit {args.kit}, keys {args.keys}, data {args.data}, state {args.state}, "
          f"coordinator {args.superlink}, policy: {policy.task}"
          f"{', labels ' + ','.join(policy.labels) if policy.labels else ''}, model {model_name(policy.model_path)} "
          f"on {policy.device}, "
          f"ε ≤ {policy.max_epsilon:g} per {unit_name(policy.privacy_unit)}, "
          f"δ ≤ {policy.max_delta if policy.max_delta else 'min(1e-5, 1/(10·public size))'}, "
          f"≥ {policy.min_sites} sites per secure round, DP and secure aggregation required"
          f"{f', privacy audit with {policy.audit_canaries} canaries' if policy.audit_canaries else ''}", flush=True)
    metrics = None
    if args.metrics_port is not None:
        from fedtune.runtime.monitoring import SiteMetrics

        metrics = SiteMetrics(args.state, policy, host=args.metrics_host, port=args.metrics_port)
        print(f"== metrics of this site (its own ledger and activity) on http://{metrics.server.address}/metrics",
              flush=True)
    try:
        code = start_client(args.kit, args.keys, args.data, args.state, superlink=args.superlink, policy=policy,
                            connect_timeout=args.connect_timeout, receipts=args.receipts,
                            on_serving=metrics.set_serving if metrics else lambda serving: None)
    finally:
        if metrics is not None:
            metrics.close()
    if code:
        log = args.state / "supernode.log"
        reasons = [line.strip() for line in log.read_text(errors="replace").splitlines()
                   if "Failed" in line or "ERROR" in line][-3:] if log.exists() else []
        print(f"fedtune: the site daemon stopped: the SuperNode could not connect for {args.connect_timeout:.0f}s "
              f"(exit {code}; see {log}). {' / '.join(reasons)}\nA site the coordinator has not registered, or a "
              "kit from another provisioning, is refused at connection.", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_audit(args: argparse.Namespace) -> None:
    """A site's privacy audit: what its ledger accounts and what its canaries show, from its state dir."""
    from common.privacy_audit import read_audit_result

    print(read_audit_result(args.state).line())


def _server_arguments(server: argparse.ArgumentParser) -> None:
    actions = server.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="SuperLink with TLS and site authentication + the fedtune run",
                               formatter_class=HelpFormatter)
    start.add_argument("--kit", type=Path, required=True, help="the server/ directory from `fedtune provision`")
    start.add_argument("--state", type=Path, required=True, help="state directory (database, checkpoints, audit)")
    start.add_argument("--host", default="127.0.0.1", help="a server host name provisioned into the certificate")
    start.add_argument("--port", type=int, default=9092)
    start.add_argument("--resume", action="store_true", help="continue from the newest checkpoint after a crash")
    _federation_options(start, simulation=False)
    _tracking_options(start)
    _metrics_options(start, "the coordinator's rounds, exchange seconds, failures by kind, contributing sites; "
                            "/readyz: the SuperLink answers")


def _client_arguments(client: argparse.ArgumentParser) -> None:
    actions = client.add_subparsers(dest="action", required=True)
    daemon = actions.add_parser("start", help="the on-premise SuperNode with TLS and the site key",
                                formatter_class=HelpFormatter)
    daemon.add_argument("--kit", type=Path, required=True,
                        help="this site's kit from the coordinator (`fedtune provision`: public files only)")
    daemon.add_argument("--keys", type=Path, required=True,
                        help="this site's own keys: the directory `fedtune site keygen --out` made here")
    daemon.add_argument("--data", type=Path, required=True, help="the site's CSV/JSONL (text,label; causal-lm: "
                                                                 "prompt,response or chat messages); never leaves")
    daemon.add_argument("--state", type=Path, required=True, help="the site's state: privacy ledger, audit log, the "
                        "member list its officer pinned (`fedtune site pin-members`; the daemon needs it)")
    daemon.add_argument("--receipts", type=Path, default=None,
                        help="where the coordinator's signed receipts of this site's ε are kept, OUTSIDE --state (a "
                             "restored state backup older than a receipt is refused); default STATE/../STATE.receipts")
    daemon.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator")
    for opt in site_policy_options():  # the site's own policy: flag, default and help from client/policy.py
        daemon.add_argument(opt.flag, dest=opt.dest, type=opt.kind, default=opt.cli_default, required=opt.required,
                            help=f"site policy: {opt.help}")
    daemon.add_argument("--connect-timeout", type=float, default=600.0,
                        help="give up after failing to connect for this many seconds (unregistered site?)")
    _metrics_options(daemon, "this site's ε spent and left (from its own ledger), rounds trained, refusals by "
                             "kind, last contact; /readyz: the SuperNode and executor run")


def _wait_ready_arguments(ready: argparse.ArgumentParser) -> None:
    ready.add_argument("--port", type=int, required=True, help="the daemon's --metrics-port")
    ready.add_argument("--host", default="127.0.0.1", help="the daemon's --metrics-host")
    ready.add_argument("--timeout", type=float, default=300.0, help="give up (exit 1) after this many seconds")


def cmd_wait_ready(args: argparse.Namespace) -> int:
    """``fedtune wait-ready``: 0 once the daemon's /readyz answers, 1 if it does not within --timeout."""
    from fedtune.runtime.monitoring import wait_ready

    if wait_ready(args.host, args.port, args.timeout):
        return 0
    print(f"fedtune wait-ready: http://{args.host}:{args.port}/readyz did not answer 200 in {args.timeout:.0f}s; "
          "see the daemon's own log (and that it runs with this --metrics-port)", file=sys.stderr)
    return EXIT_FAILED


def _tracking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlflow", metavar="URI", default=None,
                   help="log the run to MLflow (experiment 'fedtune'): its settings, each round's metrics and each "
                        "site's ε, the final adapter and its passport; a tracking server http://HOST:PORT or a "
                        "local store sqlite:///PATH/mlflow.db (pip install -e '.[ops]')")
    p.add_argument("--tensorboard", metavar="DIR", type=Path, default=None,
                   help="write each round's metrics as TensorBoard scalars under DIR/RUN (pip install -e '.[ops]')")


def _metrics_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics-port", type=int, default=None,
                   help=f"serve Prometheus metrics on this port at /metrics ({what}), and /healthz, /readyz "
                        "(pip install -e '.[ops]')")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="the address the metrics endpoint binds (0.0.0.0 for a scraper or probe on another host)")


def failure_hint(exc: RunFailed) -> str:
    """The ServerApp's own words on why the run failed, from the run's Flower log."""
    log = exc.log_path
    reasons = [line for line in log.read_text(errors="replace").splitlines() if "FederationFailed" in line] \
        if log and log.exists() else []
    return reasons[-1].split("FederationFailed: ")[-1] if reasons else ""


def _simulate_arguments(simulate: argparse.ArgumentParser) -> None:
    simulate.add_argument("--out", type=Path, required=True, help="output directory")
    simulate.add_argument("--no-dp", action="store_true", help="turn differential privacy OFF (warns)")
    simulate.add_argument("--resume", action="store_true",
                          help="continue from the newest checkpoint in --out (after a crash or Ctrl-C)")
    simulate.add_argument("--baselines", default="",
                          help="also train 'local' (each site alone) and/or 'central' (all data pooled), comma-"
                               "separated, under the same plan and DP budget; they appear in report.html")
    _federation_options(simulate, simulation=True)
    canaries = next(opt for opt in site_policy_options() if opt.key == "audit-canaries")
    simulate.add_argument(canaries.flag, dest=canaries.dest, type=canaries.kind, default=canaries.default,
                          help=f"every simulated site's policy: {canaries.help}")
    _tracking_options(simulate)


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    demo.add_argument("--banking77", type=Path, default=project_dir().parent / "shared" / "data" / "banking77",
                      help="the BANKING77 folder (train.csv, test.csv; CC BY 4.0, not shipped with fedtune)")
    demo.add_argument("--intents", type=int, default=6, help="the most frequent intents the demo keeps")
    _federation_options(demo, simulation=True)
    demo.set_defaults(partition="dirichlet", rounds=5, max_length=64)


def _audit_arguments(audit: argparse.ArgumentParser) -> None:
    audit.add_argument("state", type=Path, help="the site's state directory (its --state)")


COMMANDS: dict[str, Command] = {
    "simulate": Command("run a whole federation on this machine (Flower simulation engine)", _simulate_arguments,
                        cmd_simulate, formatter_class=HelpFormatter),
    "demo": Command("the README demo: a bank consortium under DP vs each bank alone", _demo_arguments, cmd_demo,
                    formatter_class=HelpFormatter),
    "server": Command("the coordinator (deployment)", _server_arguments, cmd_server_start),
    "client": Command("a site's daemon (deployment)", _client_arguments, cmd_client_start),
    "wait-ready": Command("wait until a daemon started with --metrics-port is ready (a service manager's health "
                          "check)", _wait_ready_arguments, cmd_wait_ready, formatter_class=HelpFormatter),
    "audit": Command("a site's privacy audit: the ε its ledger accounts and the empirical lower bound its canaries "
                     "show (`fedtune client start --audit-canaries`)", _audit_arguments, cmd_audit,
                     formatter_class=HelpFormatter),
    **DEPLOYMENT_COMMANDS,
}
"""Every ``fedtune`` command, in the order ``fedtune --help`` lists them."""


def build_parser(with_options: Collection[str] = tuple(COMMANDS)) -> tuple[
        argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int | None]]]:
    """The command line, and the handler of each command: every command with its one-line help, and the options
    of the commands in ``with_options`` (``fedtune`` builds only those of the command it runs)."""
    parser = argparse.ArgumentParser(prog="fedtune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        chosen = sub.add_parser(name, help=spec.help, description=spec.description,
                                formatter_class=spec.formatter_class)
        if name in with_options:
            spec.add_arguments(chosen)
    return parser, {name: spec.run for name, spec in COMMANDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    silence_library_noise()
    argv = sys.argv[1:] if argv is None else list(argv)
    named = [arg for arg in argv if not arg.startswith("-")][:1]  # the command: fedtune itself takes no option but -h
    parser, handlers = build_parser(with_options=named)
    args = parser.parse_args(argv)
    try:
        if args.command in FLOWER_COMMANDS:
            from common.flower_internals import check_flower_version

            check_flower_version()
        return handlers[args.command](args) or 0
    except BadInput as exc:  # config, data, model, kit (torch-heavy modules load only when a command needs them)
        print(f"fedtune: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as exc:
        print(f"fedtune: the federation failed: {exc}", file=sys.stderr)
        print(failure_hint(exc), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fedtune: interrupted; every process it started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
