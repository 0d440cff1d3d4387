"""Chapter 12's model family: parameter counts from a formula, and the recipe each size uses
(the default model's own for the smallest size). Nothing here pretrains a family model."""
import pytest

from qlora_mini.studies import model_family as F
from qlora_mini.default_model import MODEL_CONFIG


def _formula(cfg: dict) -> tuple[int, int]:
    """(total, quantized) parameters of a LLaMA with untied embeddings, counted by hand."""
    h, i, L, v = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                  cfg["vocab_size"])
    linear = L * (4 * h * h + 3 * h * i)        # q, k, v, o (full heads) + gate, up, down
    return 2 * v * h + linear + L * 2 * h + h, linear


@pytest.mark.parametrize("size", list(F.FAMILY))
def test_parameter_counts_match_the_formula(size):
    counts = F.family_parameters(size)
    assert (counts["total"], counts["quantized"]) == _formula({**MODEL_CONFIG, **F.FAMILY[size]})


def test_sizes_grow_and_heads_divide_width():
    totals = [F.family_parameters(s)["total"] for s in F.FAMILY]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    for cfg in F.FAMILY.values():
        cfg = {**MODEL_CONFIG, **cfg}
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0


def test_smallest_size_is_the_default_recipe(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(F, "default_model_dir", lambda mc, tc, root, progress: calls.append(
        (mc, tc, root)) or tmp_path)
    assert F.family_model_dir("h128-l4", root=tmp_path) == tmp_path
    F.family_model_dir("h160-l6", seed=3, root=tmp_path)
    assert calls[0] == ({}, {}, tmp_path)                  # exactly chapter 6's default model
    assert calls[1] == (F.FAMILY["h160-l6"], {"seed": 3}, tmp_path)


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match="size must be one of"):
        F.family_parameters("h4096-l80")
