"""A site's own policy: what it accepts, set by the site (daemon flags or its policy file), never by the
coordinator's run config. Light (no torch): ``fedtune client start`` builds its options from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.plan import plan_training
from common.config import (
    DEVICES,
    DP_MODES,
    QUANTIZE,
    TASKS,
    ConfigError,
    RunSettings,
    TaskKind,
    TrainSettings,
    check_unit,
    model_name,
    option,
)
from common.files import private_dir, write_json
from common.typed import from_mapping

POLICY_FILE = "policy.json"
ACCOUNTANTS = ("prv", "rdp")
"""Accountants whose ε is a valid upper bound (PRV and RDP with Poisson subsampling, add/remove-one)."""
LARGEST_DEFAULT_DELTA = 1e-5
"""The default δ ceiling of a site of any size (:func:`default_max_delta`): checked before the site's size is."""


class PolicyError(RuntimeError):
    """The run asks for less protection than this site's own policy allows."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts. Set by the site (daemon flags or its policy file), never by the run config.

    A request below it is refused before any privacy budget is spent, with a typed failure.
    """

    task: TaskKind = option("classification", "--task", "what this site fine-tunes: 'classification' (its records are "
                       "text,label) or 'causal-lm' (prompt,response or chat messages): a run naming another is "
                       "refused", choices=TASKS)
    labels: tuple[str, ...] = option(
        (), "--labels", "classification: the federation's labels, comma-separated, as agreed: every record's label "
        "must be one of them, and a run naming other labels is refused (so the coordinator cannot probe the site's "
        "labels)")
    model_path: str = option("", "--model", "the base model this site trains ('minilm' or 'smollm2', packaged, or a "
                                            "local Hugging Face directory; '' = minilm): a run naming another is "
                                            "refused")
    device: str = option("auto", "--device", "where this site trains: 'auto' (its CUDA GPU when it has one, in bf16 "
                         "where the GPU supports it), 'cpu' or 'cuda'", choices=DEVICES)
    quantize: str = option("none", "--quantize", "'nf4': QLoRA, this site holds the frozen base in 4-bit NF4 "
                           "(bitsandbytes; causal-lm models only), about a third of the memory", choices=QUANTIZE)
    max_epsilon: float = option(8.0, "--max-epsilon", "the most ε (total over the whole federation) this site will "
                                                      "ever agree to")
    max_delta: float | None = option(None, "--max-delta", "the largest δ accepted (default: min(1e-5, 1/(10·m)) "
                                                          "rounded down to a power of ten, for the site's public "
                                                          "size m: declared, or its DP estimate)", kind=float)
    max_rounds: int = option(100, "--max-rounds", "the most rounds a run may plan (the site's budget is spread over "
                                                  "them; distributed DP, one step per round: the most rounds is "
                                                  "max-rounds × max-steps-per-round)")
    max_steps_per_round: int = option(2000, "--max-steps-per-round", "the most training steps a round may take (the "
                                      "run's batch size and epochs set them, from the site's public size)")
    accountants: tuple[str, ...] = ACCOUNTANTS
    require_dp: bool = True
    require_secure_aggregation: bool = True
    min_sites: int = option(3, "--min-sites", "fewest sites in a secure-aggregation round (with two, each site "
                                              "learns the other's update from the sum)")
    all_pairs_up_to: int = 64
    """Secure rounds with at most this many sites must mask every pair (no server-chosen graph)."""
    min_degree: int = 0
    """Fewest mask partners per site in a larger round; 0 = 2·ceil(log2 n) (SecAgg+)."""
    declared_examples: int | None = option(
        None, "--declared-examples", "this site's public size, in privacy units (records, or persons with a column "
        "unit): its weight in averaging (default: equal weights) and the size its training plan is computed from "
        "(default: a DP estimate of its number of units, drawn once for ε/50 of the budget); it is public, so "
        "never put the true count here unless it is public", kind=int)
    privacy_unit: str = option("record", "--privacy-unit", "whom ε protects: 'record', or 'column:NAME' (e.g. "
                               "column:patient_id: all of a patient's rows are one unit); the run must name the same "
                               "unit, so the coordinator can never turn a per-patient site into a per-row one")
    max_rows_per_unit: int = option(8, "--max-rows-per-unit", "with a per-person unit: at most this many of a "
                                    "person's rows (drawn afresh) train per step; a run may ask for fewer, never "
                                    "more. It bounds one unit's forward pass (rows × data.max-length tokens)")
    audit_canaries: int = option(0, "--audit-canaries", "audit this site's privacy in every DP run with this many "
                                 "gradient canaries (e.g. 200; half included at random, known only to the site): "
                                 "after each round it computes an empirical lower bound on its ε from the global "
                                 "adapters (`fedtune audit STATE`) and reports it with its ε; 0 = no audit. "
                                 "Canaries cost some utility, never budget")
    eval_fraction: float = option(0.2, "--eval-fraction", "the share of this site's units (records, or persons "
                                  "whole) held out as its own evaluation split, drawn once with OS randomness and "
                                  "kept in its state dir (eval-split.json): they never train, and the site scores "
                                  "each round's model on them (federated evaluation: only noisy counts leave, inside "
                                  "the secure sum); 0 = this site does not evaluate")
    eval_data: str = option("", "--eval-data", "a CSV/JSONL of this site's evaluation records instead of "
                            "--eval-fraction (its units must not be in the training data)")
    dp_modes: tuple[str, ...] = option(
        ("local",), "--dp-modes", "the DP modes this site trains in, comma-separated: 'local' (its own update carries "
        "the full noise) and/or 'distributed' (it adds only a share of the noise and trusts secure aggregation and "
        "--min-honest-sites to hide its upload: opt in only if you accept that trust)")
    min_honest_sites: int | None = option(
        None, "--min-honest-sites", "distributed DP: the fewest honest sites this site assumes in a round (their "
        "noise shares alone reach the run's ε, so its own share is 1/this of the noise); it refuses a round with "
        "fewer sites. Default: the round's secure-aggregation threshold", kind=int)
    max_eval_epsilon: float = option(1.0, "--max-eval-epsilon", "the most ε a run's federated evaluations may spend "
                                     "in total on this site's evaluation split (federation.eval-epsilon); apart from "
                                     "--max-epsilon: those units never train")

    def __post_init__(self) -> None:
        problems = []
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.quantize not in QUANTIZE:
            problems.append(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.task not in TASKS:
            problems.append(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        try:
            check_unit(self.privacy_unit, "privacy-unit")
        except ConfigError as exc:
            problems.append(str(exc))
        if not 0 < self.max_epsilon < float("inf"):
            problems.append(f"max-epsilon must be a positive number, got {self.max_epsilon}")
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            problems.append(f"max-delta must be in (0, 1), got {self.max_delta}")
        if not set(self.accountants) <= set(ACCOUNTANTS) or not self.accountants:
            problems.append(f"accountants must be among {ACCOUNTANTS}, got {self.accountants}")
        if self.max_rounds < 1 or self.max_steps_per_round < 1:
            problems.append("max-rounds and max-steps-per-round must be >= 1")
        if self.min_sites < 2:
            problems.append(f"min-sites must be >= 2, got {self.min_sites}")
        if self.all_pairs_up_to < 0 or self.min_degree < 0:
            problems.append("all-pairs-up-to and min-degree must be >= 0")
        if len(set(self.labels)) != len(self.labels):
            problems.append(f"labels must name each label once, got {self.labels}")
        if self.max_rows_per_unit < 1:
            problems.append(f"max-rows-per-unit must be >= 1, got {self.max_rows_per_unit}")
        if self.audit_canaries < 0 or self.audit_canaries == 1:
            problems.append(f"audit-canaries must be 0 (no audit) or >= 2, got {self.audit_canaries}")
        if self.declared_examples is not None and self.declared_examples < 1:
            problems.append(f"declared-examples must be >= 1, got {self.declared_examples}")
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"eval-fraction must be in [0, 1) (0 = no evaluation split), got {self.eval_fraction}")
        if not 0 < self.max_eval_epsilon < float("inf"):
            problems.append(f"max-eval-epsilon must be a positive number, got {self.max_eval_epsilon}")
        if not self.dp_modes or not set(self.dp_modes) <= set(DP_MODES):
            problems.append(f"dp-modes must name some of {', '.join(DP_MODES)}, got {','.join(self.dp_modes)!r}")
        if self.min_honest_sites is not None and self.min_honest_sites < 1:
            problems.append(f"min-honest-sites must be >= 1 (or unset: the round's threshold), got "
                            f"{self.min_honest_sites}")
        if problems:
            raise ConfigError("site policy: " + "; ".join(problems))

    def check_complete(self) -> None:
        """A classifying site must name its labels (a site daemon does not start without them)."""
        if self.task == "classification" and not self.labels:
            raise ConfigError("this site's policy names no labels: set them with `fedtune client start --labels` "
                              "(a simulated site's policy.json is written by `fedtune simulate`)")

    def check_task(self, settings: RunSettings) -> None:
        """Refuse a run on another task, label set or model, before the site's data is even read."""
        if settings.task != self.task:
            raise PolicyError(f"the run's task {settings.task!r} is not the one this site fine-tunes {self.task!r}")
        self.check_complete()
        if settings.data.labels != self.labels:
            raise PolicyError(f"the run's labels {settings.data.labels} are not the ones this site agreed to "
                              f"{self.labels}")
        if model_name(settings.model_path) != model_name(self.model_path):
            raise PolicyError(f"the run's model {settings.model_path!r} is not the one this site trains "
                              f"{self.model_path!r}")

    def check(self, settings: RunSettings) -> None:
        """Refuse a run that asks for less protection than this policy, on everything the site's size does not
        decide: before the site draws its size estimate, and before anything is spent."""
        self.check_task(settings)
        privacy = settings.privacy
        if not privacy.enabled:
            if self.require_dp:
                raise PolicyError("the run turns differential privacy off; this site requires DP")
        else:
            if privacy.unit != self.privacy_unit:
                raise PolicyError(f"the run's privacy unit {privacy.unit!r} is not this site's {self.privacy_unit!r}")
            if privacy.epsilon > self.max_epsilon:
                raise PolicyError(f"the run asks for a budget ε={privacy.epsilon:g}; this site allows at most "
                                  f"ε={self.max_epsilon:g}")
            self._check_delta(privacy.delta, self.max_delta if self.max_delta is not None else LARGEST_DEFAULT_DELTA)
            if privacy.dp_mode not in self.dp_modes:
                raise PolicyError(f"the run asks for DP mode {privacy.dp_mode!r}; this site trains only in "
                                  f"{', '.join(self.dp_modes)} (policy dp-modes)")
            if privacy.dp_mode == "distributed" and not settings.federation.secure_aggregation:
                raise PolicyError("distributed DP without secure aggregation: the site's upload would carry only its "
                                  "share of the noise, in the clear")
            if privacy.accountant not in self.accountants:
                raise PolicyError(f"the run asks for the {privacy.accountant!r} accountant; this site accepts "
                                  f"{', '.join(self.accountants)}")
        if settings.federation.eval_every and settings.federation.eval_epsilon > self.max_eval_epsilon:
            raise PolicyError(f"the run's federated evaluations ask for ε={settings.federation.eval_epsilon:g}; this "
                              f"site allows at most ε={self.max_eval_epsilon:g} (policy max-eval-epsilon)")
        if settings.privacy.dp_mode == "distributed":  # a round is one step: the most steps a run may take
            if settings.federation.rounds > (most := self.max_rounds * self.max_steps_per_round):
                raise PolicyError(f"the run plans {settings.federation.rounds} distributed-DP rounds (one step each); "
                                  f"this site allows at most {most} steps (policy max-rounds × max-steps-per-round)")
        elif settings.federation.rounds > self.max_rounds:
            raise PolicyError(f"the run plans {settings.federation.rounds} rounds; this site allows at most "
                              f"{self.max_rounds} (policy max-rounds)")
        if self.require_secure_aggregation and not settings.federation.secure_aggregation:
            raise PolicyError("the run turns secure aggregation off; this site requires it")

    def honest_sites(self, threshold: int) -> int:
        """h: the fewest honest sites this site assumes in a round whose secure-aggregation threshold is
        ``threshold`` (its policy's min-honest-sites, by default the threshold)."""
        return self.min_honest_sites if self.min_honest_sites is not None else threshold

    def check_participants(self, participants: int, threshold: int) -> None:
        """Distributed DP: refuse a round with fewer sites than the honest ones this site assumes (their noise
        shares could not reach the target), before anything is spent."""
        if participants < (honest := self.honest_sites(threshold)):
            raise PolicyError(f"the round has {participants} site(s); this site assumes {honest} honest site(s) "
                              "(policy min-honest-sites) whose noise together reaches ε: it needs at least that many")

    def check_noise_share(self, round_honest_sites: int, threshold: int) -> None:
        """Distributed DP: every site of the round adds μ/h for the round's one h. Refuse an h above this site's own
        assumption: its assumed honest sites' shares would not reach μ."""
        if round_honest_sites > (honest := self.honest_sites(threshold)):
            raise PolicyError(f"the round's noise shares assume {round_honest_sites} honest sites; this site assumes "
                              f"{honest} (policy min-honest-sites), whose shares would then not reach ε")

    def check_plan(self, settings: RunSettings, public_units: int) -> None:
        """Refuse a run whose plan, at the site's public size (declared, or its DP estimate: never its true count),
        passes the default δ ceiling or the most steps per round; before any round is charged."""
        if settings.privacy.enabled and self.max_delta is None:
            self._check_delta(settings.privacy.delta, default_max_delta(public_units))
        plan = plan_training(public_units, settings.train, settings.privacy, settings.federation.rounds)
        if plan.steps > self.max_steps_per_round:
            raise PolicyError(f"the run's plan takes {plan.steps} steps per round; this site allows at most "
                              f"{self.max_steps_per_round} (policy max-steps-per-round): raise train.batch-size, "
                              "lower train.local-epochs, or plan more rounds")

    @staticmethod
    def _check_delta(delta: float, most: float) -> None:
        if delta > most:
            raise PolicyError(f"the run asks for δ={delta:g}; this site allows at most δ={most:.3g}")

    def train_settings(self, settings: RunSettings) -> TrainSettings:
        """The run's training settings within this policy: the site owns how many of a unit's rows one pass
        may hold (the coordinator may lower it, which costs only utility): no unit's pass grows past it."""
        return dataclasses.replace(settings.train,
                                   max_rows_per_unit=min(settings.train.max_rows_per_unit, self.max_rows_per_unit))

    def weakened(self) -> list[str]:
        """The protections this policy turns off, for a loud warning."""
        return [what for what, off in (("differential privacy", not self.require_dp),
                                       ("secure aggregation", not self.require_secure_aggregation),
                                       (f"secure rounds of {self.min_sites} sites", self.min_sites < 3)) if off]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> SitePolicy:
        """Parse ``{"max-epsilon": 8, ...}`` (node config ``policy.*`` keys or policy.json)."""
        return from_mapping(cls, values, where, what="site policy setting", text_values=True)

    def to_mapping(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): (",".join(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def default_max_delta(public_units: int) -> float:
    """min(1e-5, 1/(10·m) rounded down to a power of ten), for the site's public size m (declared, or its DP
    estimate ñ: never its true count, so a refusal it causes is a function of public values)."""
    return min(LARGEST_DEFAULT_DELTA, 10.0 ** math.floor(math.log10(1 / (10 * max(1, public_units)))))


def write_policy(state_dir: Path, policy: SitePolicy) -> Path:
    """A simulated site's own policy file (owner-only), as the person playing the sites set it."""
    path = private_dir(state_dir) / POLICY_FILE  # the site's state dir is 0700 from the start
    write_json(path, policy.to_mapping())
    return path
