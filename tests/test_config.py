"""Run-config parsing: one parse into typed settings; bad values are named with their key."""

import pytest

from common.config import ConfigError, RunSettings


def test_flat_config_parses_into_typed_sections():
    settings = RunSettings.from_flat({
        "privacy.epsilon": 4, "lora.targets": "query, value,key", "federation.secure-aggregation": False,
        "out-dir": "/tmp/x", "data.labels": "a,b",
    })
    assert settings.privacy.epsilon == 4.0 and isinstance(settings.privacy.epsilon, float)
    assert settings.lora.targets == ("query", "value", "key")
    assert settings.federation.secure_aggregation is False
    assert settings.data.labels == ("a", "b")
    assert str(settings.out_dir) == "/tmp/x"


@pytest.mark.parametrize("flat, fragment", [
    ({"privacy.epsilon": -1.0}, "privacy.epsilon must be a positive number"),
    ({"privacy.epsilon": "eight"}, "privacy.epsilon must be a number"),
    ({"privacy.delta": 1.5}, "privacy.delta must be in (0, 1)"),
    ({"federation.rounds": 2.5}, "federation.rounds must be a whole number"),
    ({"federation.min-sites": 5, "federation.sites": 3}, "federation.min-sites must be in [1, sites=3]"),
    ({"lora.aggregation": "median"}, "lora.aggregation must be 'ffa' or 'plain'"),
    ({"data.partition": "random"}, "data.partition must be"),
    ({"privacy.enabled": "yes"}, "privacy.enabled must be true or false"),
    ({"privacy.epsilonn": 8.0}, "unknown setting(s): privacy.epsilonn"),
    ({"data.labels": "a,a"}, "data.labels has duplicates"),
    ({"secagg.clip": 0.0}, "secagg.clip must be > 0"),
    ({"secagg.max-examples": 2**21}, "secagg.max-examples must be in [1, 1048575]"),
])
def test_bad_config_is_named(flat, fragment):
    with pytest.raises(ConfigError) as info:
        RunSettings.from_flat({"federation.secure-aggregation": False} | flat)
    assert fragment in str(info.value)


def test_secure_aggregation_needs_a_registry():
    with pytest.raises(ConfigError, match="needs secagg.registry"):
        RunSettings.from_flat({"federation.secure-aggregation": True})
    assert RunSettings.from_flat({"secagg.registry": "/x/registry.json"}).federation.secure_aggregation


def test_settings_are_frozen():
    settings = RunSettings.from_flat({"secagg.registry": "r.json"})
    with pytest.raises(AttributeError):
        settings.privacy.epsilon = 100.0  # type: ignore[misc]


def test_pyproject_defaults_parse():
    from fedtune.cli import default_run_config

    settings = RunSettings.from_flat(default_run_config() | {"secagg.registry": "r.json"})
    assert settings.lora.aggregation == "ffa" and settings.privacy.enabled


def test_pyproject_defaults_are_the_dataclass_defaults():
    """One source of truth: every run-config key in pyproject.toml holds its dataclass field's default
    (secure aggregation is on in both; switched off here only because it needs a registry file)."""
    from common.config import FederationSettings
    from fedtune.cli import default_run_config

    flat = default_run_config()
    assert flat["federation.secure-aggregation"] is FederationSettings().secure_aggregation is True
    parsed = RunSettings.from_flat(flat | {"federation.secure-aggregation": False})
    assert parsed == RunSettings(federation=FederationSettings(secure_aggregation=False))


def test_every_key_the_command_line_sends_is_declared_in_pyproject():
    """Flower refuses a run-config key the app's pyproject.toml does not declare ("Invalid run configuration"),
    so a setting the command line can send but pyproject lacks would break every deployed run."""
    from fedtune.cli import build_parser, default_run_config, training_run_config

    parser, _ = build_parser()
    sent = training_run_config(parser.parse_args(["server", "start", "--kit", "k", "--state", "s"]))
    assert sorted(set(sent) - set(default_run_config())) == []


@pytest.mark.parametrize("command", [["simulate", "--out", "x"], ["server", "start", "--kit", "k", "--state", "s"]])
def test_each_options_default_and_help_come_from_its_setting(command):
    """The command line is built from the settings' ``option(...)`` fields: parsed with no flags, it yields
    the dataclass defaults; every help is written once, and none says "(default: )"."""
    from common.config import SecureAggSettings
    from fedtune.cli import HelpFormatter, build_parser, training_run_config

    parser, _ = build_parser()
    args = parser.parse_args(command)
    flat = training_run_config(args) | {"secagg.registry": "r.json"}
    assert RunSettings.from_flat(flat) == RunSettings(secagg=SecureAggSettings(registry="r.json"))
    sub = parser._subparsers._group_actions[0].choices[command[0]]  # the generated parser itself
    if command[0] == "server":
        sub = sub._subparsers._group_actions[0].choices["start"]
        assert "--data" not in sub.format_help() and "--partition" not in sub.format_help()  # simulation only
    text = sub.format_help()
    assert "(default: )" not in text and text.count("each site's TOTAL ε budget") == 1
    assert isinstance(sub.formatter_class(prog="x"), HelpFormatter)


def test_the_site_daemons_options_come_from_the_site_policy():
    """``client start``'s policy flags are the SitePolicy fields' own: with only --labels, the daemon's policy
    is the default policy; a classifying site without --labels does not start, a causal-lm site needs none."""
    from client.policy import SitePolicy
    from fedtune.cli import build_parser, site_policy_options

    base = ["client", "start", "--kit", "k", "--keys", "k", "--data", "d", "--state", "s", "--superlink", "h:1"]

    def policy(*flags: str) -> SitePolicy:
        args = build_parser()[0].parse_args([*base, *flags])
        return SitePolicy.from_mapping({opt.key: getattr(args, opt.dest) for opt in site_policy_options()}, "test")

    assert policy("--labels", "no,yes") == SitePolicy(labels=("no", "yes"))
    with pytest.raises(ConfigError, match="--labels"):
        policy().check_complete()
    llm = policy("--task", "causal-lm", "--model", "smollm2")
    llm.check_complete()
    assert (llm.task, llm.model_path, llm.labels) == ("causal-lm", "smollm2", ())


def test_a_simulated_sites_policy_dir_is_private_from_the_start(tmp_path, caplog) -> None:
    """No "was mode 0755" warning on the terminal of a simulation: the state dir is made 0700, not tightened."""
    import json
    import logging
    import stat

    from client.policy import SitePolicy, write_policy

    with caplog.at_level(logging.WARNING):
        path = write_policy(tmp_path / "sites" / "site-0", SitePolicy(labels=("a", "b")))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert caplog.records == [] and SitePolicy.from_mapping(json.loads(path.read_text()), "p").labels == ("a", "b")
