"""Chapter 12 on a real LLM: document NLLs of replies and their bootstrap intervals."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from qlora_mini.studies import llm_datatypes as L


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_model import make_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


ROW = {"input": "### Human: What does len() return? ### Assistant:",
       "output": "The number of items in a container."}


def test_reply_ids_put_the_reply_last_and_cut_the_conversation_first(tiny):
    _, tok = tiny
    ids, start = L.reply_ids(tok, ROW)
    reply = tok(" " + ROW["output"], add_special_tokens=False)["input_ids"]
    assert ids[start:].tolist() == reply and start == len(tok(ROW["input"])["input_ids"])
    short, s = L.reply_ids(tok, ROW, max_tokens=len(reply) + 2)
    assert short.numel() == len(reply) + 2 and short[s:].tolist() == reply and s == 2
    only, s = L.reply_ids(tok, ROW, max_tokens=4)          # shorter than the reply itself
    assert only.numel() == 4 and s == 1


def test_document_nll_is_transformers_loss_on_the_reply(tiny):
    """Independently: transformers' own loss with the conversation masked out (-100) is the mean
    NLL of the reply tokens; ours is its sum and the count."""
    model, tok = tiny
    docs = [L.reply_ids(tok, ROW), L.reply_ids(tok, {**ROW, "output": "A number."})]
    got = L.document_nll(model, docs)
    for (ids, start), (nll, n) in zip(docs, got):
        labels = ids.clone()
        labels[:start] = -100
        with torch.no_grad():
            loss = model(input_ids=ids[None], labels=labels[None]).loss.item()
        assert n == ids.numel() - start
        assert nll == pytest.approx(loss * n, rel=1e-5)


def _docs(seed: int, n: int = 60, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 400, n).astype(float)
    return np.column_stack([tokens * (2.0 + shift + 0.5 * rng.standard_normal(n)), tokens])


def test_bootstrap_ppl_agrees_with_scipy():
    doc = _docs(0)
    ours = L.bootstrap_ppl(doc, B=4000)
    ratio = lambda nll, n, axis=-1: np.exp(nll.sum(axis) / n.sum(axis))
    ref = stats.bootstrap((doc[:, 0], doc[:, 1]), ratio, paired=True, vectorized=True,
                          n_resamples=4000, method="percentile", random_state=1)
    assert ours["ppl"] == pytest.approx(np.exp(doc[:, 0].sum() / doc[:, 1].sum()))
    assert ours["low"] == pytest.approx(ref.confidence_interval.low, rel=0.01)
    assert ours["high"] == pytest.approx(ref.confidence_interval.high, rel=0.01)


def test_bootstrap_ratio_is_paired():
    a = _docs(1)
    b = a.copy()
    b[:, 0] = a[:, 0] - 0.05 * a[:, 1]               # every document 0.05 nats/token better
    r = L.bootstrap_ratio(a, b)
    assert r["ratio"] == pytest.approx(np.exp(0.05)) and r["low"] == pytest.approx(np.exp(0.05))
    with pytest.raises(AssertionError, match="same documents"):
        L.bootstrap_ratio(a, _docs(2))


@pytest.mark.parametrize("argv, says", [(["--blocksizes", "100"], "--blocksizes"),
                                        (["--threads", "0"], "--threads")])
def test_bad_arguments_are_refused_before_any_work(argv, says, tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "qlora_mini.studies.llm_datatypes", *argv,
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_a_damaged_results_file_is_refused_and_kept(tmp_path):
    out = tmp_path / "r.json"
    out.write_text('{"entries": [1, 2')
    run = subprocess.run([sys.executable, "-m", "qlora_mini.studies.llm_datatypes", "--out",
                          str(out)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error:") and "Traceback" not in run.stderr
    assert out.read_text() == '{"entries": [1, 2'
