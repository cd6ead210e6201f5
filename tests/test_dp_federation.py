"""The dp-federation benchmark's own pieces: synthetic customers, pooling sites for the central rows."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from common.encoding import EncodedData
from simulations.benchmarks.dp_federation import (
    Setup,
    concat,
    head_init,
    main,
    reference,
    server_step,
    table,
    with_customers,
)


def test_synthetic_customers_hold_one_to_five_rows_and_are_seeded():
    rows = [{"text": str(i), "label": "x"} for i in range(500)]
    grouped = with_customers(rows, seed=3)
    sizes = Counter(row["customer"] for row in grouped)
    assert set(sizes.values()) <= {1, 2, 3, 4, 5} and len(set(sizes.values())) == 5
    assert sum(sizes.values()) == 500 and [r["text"] for r in grouped] == [r["text"] for r in rows]
    assert with_customers(rows, seed=3) == grouped and with_customers(rows, seed=4) != grouped
    assert "customer" not in rows[0]  # the input is not modified


def test_pooling_sites_keeps_every_row_and_keeps_units_apart():
    def site(n: int, width: int, units: list[int]) -> EncodedData:
        ids = torch.ones(n, width, dtype=torch.long)
        return EncodedData(TensorDataset(ids, torch.ones_like(ids), torch.zeros(n, dtype=torch.long)),
                           np.zeros(n, dtype=np.int64), np.array(units))

    pooled = concat([site(3, 4, [0, 0, 1]), site(2, 6, [0, 1])])
    assert len(pooled) == 5 and pooled.dataset.tensors[0].shape == (5, 6)
    assert pooled.units.tolist() == [0, 0, 1, 2, 3] and pooled.unit_count == 4
    assert pooled.dataset.tensors[1][:3, 4:].sum() == 0  # the narrower site is padded, not stretched


def test_a_misspelt_site_optimizer_is_refused_by_name():
    with pytest.raises(SystemExit, match="site-optimizer must be one of fresh, kept, got 'keep'"):
        main(["--rows", "", "--site-optimizer", "keep"])


def test_a_misspelt_head_init_is_refused_by_name_and_old_rows_read_as_random():
    with pytest.raises(SystemExit, match="--head-init must be 'label-names' or 'random', got 'labels'"):
        main(["--rows", "", "--head-init", "labels"])
    measured_before = {key: value for key, value in vars(Setup()).items() if key != "head_init"}
    assert head_init(measured_before) == "random" and head_init(vars(Setup())) == "label-names"


def test_each_row_names_how_it_combined_its_rounds():
    assert server_step(vars(Setup()) | {"server": "fedavg", "server_lr": 1.0}) == "fedavg"
    assert server_step(vars(Setup(site_optimizer="kept")) | {"server": "fedadam", "server_lr": 0.05}) == \
        "fedadam (η=0.05), site AdamW kept"


def test_a_distributed_row_names_its_trust_assumption_ring_and_the_epsilon_of_one_sites_noise():
    plan = {"honest_sites": 3, "local_epsilon": 21.234, "ring_bits": 17, "upload_vs_fp32": 0.93}
    result = {"row": "fed-dp-distributed", "setup": vars(Setup()), "macro_f1": [0.8], "cpu_s": 1,
              "distributed": plan, "evaluated_rounds": [5, 10]}
    line = table([result]).splitlines()[2]
    assert line.startswith("| fed-dp-distributed (3/5 honest, ε alone 21.2, 17-bit ring = 0.93× fp32) |")
    assert "| adam (η=0.02) on the pooled step |" in line and "| 8.0 |" in line


def test_each_row_is_compared_with_the_pooled_reference_that_read_the_same_features():
    def row(name: str, f1: float, per_site: int, features: str | None) -> dict:
        result = {"row": name, "setup": vars(Setup(per_site=per_site)), "macro_f1": [f1], "cpu_s": 1}
        return result | ({"features": features} if features else {})

    old_central, old_fed_dp = row("central", 0.9, 1000, None), row("fed-dp", 0.45, 2000, None)
    central, fed_dp = row("central", 0.8, 2000, "mean-pooled"), row("fed-dp", 0.72, 2000, "mean-pooled")
    results = [old_central, old_fed_dp, central, fed_dp]
    assert reference(fed_dp, results) == (0.8, True)  # same features, same size
    assert reference(old_fed_dp, results) == (0.9, False)  # only another size measured: marked
    assert reference(fed_dp, [old_central, fed_dp]) is None  # never against a model that read other features
    lines = table(results).splitlines()
    assert "| 0.900 |" in lines[2] and "| 0.50† |" in lines[3] and "| 0.90 |" in lines[5]


def test_the_plot_has_one_panel_per_epsilon_with_the_non_dp_reference_in_each(tmp_path, monkeypatch):
    from matplotlib import pyplot

    from simulations.benchmarks.dp_federation import plot

    def row(name: str, epsilon: float) -> dict:
        return {"row": name, "setup": vars(Setup(per_site=400, epsilon=epsilon)), "macro_f1": [0.6, 0.7], "cpu_s": 1,
                "features": "mean-pooled"}

    titles: list[list[str]] = []
    monkeypatch.setattr(pyplot.Figure, "savefig", lambda figure, path, **kwargs: titles.append(
        [(axes.get_title(), len(axes.get_lines())) for axes in figure.axes if axes.get_visible()]))
    plot([row("central", 8.0), row("central-dp", 8.0), row("fed-dp", 8.0), row("central-dp", 3.0),
          row("fed-dp", 1.0)], tmp_path / "plot.png")
    assert titles == [[("5 × 400 records, per record, ε = 8", 3), ("5 × 400 records, per record, ε = 3", 2),
                       ("5 × 400 records, per record, ε = 1", 2)]]
