"""The library warnings fedtune silences are exactly the ones that say nothing about a run.

Each is raised here by the real library call that raises it in a run (peft wrapping a tiny model
built in the test, Opacus searching for σ); after :func:`silence_library_noise` none shows, while
the same message from another module, or of another category, still does.
"""

from __future__ import annotations

import warnings

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from common.library_noise import LIBRARY_NOISE, LibraryNoise, silence_library_noise


def library_calls() -> None:
    """What a round does that makes transformers (through peft) and Opacus warn: wrap a model; bound ε at a σ
    far above the answer, as Opacus' search for σ and its PRV accountant's domain bound do; account for a
    full-batch step (q = 1) with the PRV accountant."""
    tiny = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=8, num_labels=2))
    get_peft_model(tiny, LoraConfig(r=2, target_modules=["query", "value"]))
    accountant = RDPAccountant()
    accountant.history = [(10.0, 0.01, 1)]  # (σ, q, steps)
    accountant.get_epsilon(delta=1e-5)
    PoissonSubsampledGaussianPRV(sample_rate=1.0, noise_multiplier=1.0).cdf(np.array([0.0]))


def module_name(noise: LibraryNoise) -> str:
    return noise.module.removesuffix(r"\Z").replace("\\", "")


def shown(*, silenced: bool) -> list[tuple[str, str, str]]:
    """(category, message, module) of each warning the library calls raise, then of two look-alikes each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if silenced:
            silence_library_noise()
        library_calls()
        for noise in LIBRARY_NOISE:
            warnings.warn_explicit(noise.message, noise.category, "elsewhere.py", 1, module="elsewhere")
            warnings.warn_explicit(noise.message, ResourceWarning, "same.py", 1, module=module_name(noise))
    return [(w.category.__name__, str(w.message), w.filename) for w in caught]


def test_the_warnings_a_run_raises_but_says_nothing_with_are_silenced_and_no_others() -> None:
    before, after = shown(silenced=False), shown(silenced=True)
    for noise in LIBRARY_NOISE:
        category = noise.category.__name__
        raised = [w for w in before if w[0] == category and w[1].startswith(noise.message) and
                  w[2] not in ("elsewhere.py", "same.py")]
        assert raised, f"{category} {noise.message!r} is no longer raised: take it out of LIBRARY_NOISE"
        assert [w for w in after if w[1].startswith(noise.message)] == [
            (category, noise.message, "elsewhere.py"), ("ResourceWarning", noise.message, "same.py")]
