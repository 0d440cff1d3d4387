"""Instruction data (chapter 8): formats, local files, labels, length-grouped batches."""
import json

import pytest
import torch

from qlora_mini import data as D
from tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_formats():
    assert D.to_input_output({"text": "### Human: hi ### Assistant: hello"}) == {
        "input": "", "output": "### Human: hi ### Assistant: hello"}
    alp = D.to_input_output({"instruction": "Add.", "input": "2, 3", "output": "5"})
    assert alp["input"].endswith("### Instruction:\nAdd.\n\n### Input:\n2, 3\n\n### Response: ")
    assert "### Input" not in D.to_input_output({"instruction": "Hi.", "output": "x"})["input"]
    assert D.to_input_output({"input": "q", "output": "a"}) == {"input": "q", "output": "a"}
    with pytest.raises(ValueError, match="rec 3: missing field 'output' for format 'alpaca'"):
        D.to_input_output({"instruction": "x"}, where="rec 3")
    with pytest.raises(ValueError, match="field 'text' must be a string, got int"):
        D.to_input_output({"text": 3})
    with pytest.raises(ValueError, match="dataset_format='chat'"):
        D.to_input_output({"text": "x"}, fmt="chat")


def test_local_files(tmp_path):
    recs = [{"input": f"q{i}", "output": f"a{i}"} for i in range(20)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "d.csv").write_text("input,output\n" + "".join(f"q{i},a{i}\n" for i in range(20)))
    splits = [D.load_splits(str(tmp_path / f"d.{ext}"), seed=1) for ext in ("json", "jsonl", "csv")]
    assert splits[0] == splits[1] == splits[2]
    train, held = splits[0]
    assert len(train) == 18 and len(held) == 2
    assert sorted(r["input"] for r in train + held) == sorted(r["input"] for r in recs)
    (tmp_path / "bad.jsonl").write_text('{"input": "q", "output": "a"}\n{"input": "q",\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON line"):
        D.load_splits(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        D.load_splits(str(tmp_path / "missing.csv"))


def test_stdlib_qa_is_real_and_split():
    qa = D.stdlib_qa()
    assert len(qa) > 200
    dumps = next(r for r in qa if r["question"] == "What does `json.dumps` do?")
    assert dumps["text"].startswith("### Human: What does `json.dumps` do? ### Assistant: Serialize")
    held = [r for r in qa if r["split"] == "eval"]
    assert 0.05 < len(held) / len(qa) < 0.2
    train, ev = D.load_splits(D.DEFAULT_DATA)
    assert len(train) + len(ev) == len(qa) and all(r["input"] == "" for r in train)


def test_labels_target_only_or_whole_text(tok):
    ex = {"input": "What is 2+2?", "output": " 4"}
    t = D.tokenize_example(tok, ex, source_max_len=16, target_max_len=8)
    n_src = 1 + len(tok.encode(ex["input"], add_special_tokens=False))
    assert t["input_ids"][0] == tok.bos_token_id and t["input_ids"][-1] == tok.eos_token_id
    assert t["labels"][:n_src] == [D.IGNORE_INDEX] * n_src and t["labels"][n_src:] == t["input_ids"][n_src:]
    whole = D.tokenize_example(tok, ex, train_on_source=True)
    assert whole["labels"] == whole["input_ids"]
    short = D.tokenize_example(tok, {"input": "x " * 50, "output": "y " * 50}, 16, 8)
    assert len(short["input_ids"]) == 24 and short["labels"][-1] != tok.eos_token_id  # truncated
    batch = D.collate([t, short], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 24) and batch["attention_mask"][0].sum() == len(t["input_ids"])
    assert (batch["labels"][0, len(t["input_ids"]):] == D.IGNORE_INDEX).all()


def test_group_by_length_matches_transformers():
    from transformers.trainer_pt_utils import get_length_grouped_indices
    lengths = torch.randint(5, 500, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    for bs in (1, 4, 16):
        ours = D.length_grouped_order(lengths, bs, torch.Generator().manual_seed(3))
        ref = get_length_grouped_indices(lengths, bs, generator=torch.Generator().manual_seed(3))
        assert ours == list(ref)
        assert lengths[ours[0]] == max(lengths)  # the longest example comes first
    batches = D.epoch_batches(lengths, 4, seed=0, epoch=2)
    assert batches == D.epoch_batches(lengths, 4, seed=0, epoch=2)  # a pure function of (seed, epoch)
    assert batches != D.epoch_batches(lengths, 4, seed=0, epoch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_bos_and_pad_fallbacks():
    from types import SimpleNamespace as NS
    assert D.bos_ids(NS(bos_token_id=1)) == [1] and D.bos_ids(NS(bos_token_id=None)) == []
    assert D.bos_ids(NS(bos_token_id=0)) == [0]                      # 0 is a valid id
    assert D.pad_token_id(NS(pad_token_id=3, eos_token_id=2)) == 3
    assert D.pad_token_id(NS(pad_token_id=None, eos_token_id=2)) == 2  # LLaMA: pad with eos
    assert D.pad_token_id(NS(pad_token_id=0, eos_token_id=2)) == 0
