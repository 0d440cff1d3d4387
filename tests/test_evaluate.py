"""Evaluation (chapter 8): held-out loss, MMLU-style multiple choice, Guanaco generation."""
import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from qlora_mini import data as D
from qlora_mini import evaluate as E
from tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_eval_loss_matches_transformers_loss(tiny):
    model, tok = tiny
    examples = [D.tokenize_example(tok, r) for r in D.load_splits(D.DEFAULT_DATA)[1][:3]]
    ours = E.eval_loss(model, examples, tok.pad_token_id, batch_size=2)
    # one example at a time: HF's loss is the mean over that example's label tokens
    per = [(model(**{k: v for k, v in D.collate([e], tok.pad_token_id).items()}).loss.item(),
            sum(l != D.IGNORE_INDEX for l in e["labels"][1:])) for e in examples]
    ref = sum(l * n for l, n in per) / sum(n for _, n in per)
    assert ours["loss"] == pytest.approx(ref, rel=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_stdlib_mcq_layout(tmp_path):
    folder = E.make_stdlib_mcq(tmp_path, n_dev=5)
    data = E.read_mcq_dir(folder)
    assert set(data) == {"python_docstrings", "python_modules"}
    for subject, split in data.items():
        assert len(split["dev"]) == 5 and len(split["test"]) > 20
        for row in split["test"]:
            assert len(row) == 6 and row[5] in "ABCD" and len(set(row[1:5])) == 4
    with open(folder / "test" / "python_modules_test.csv") as f:
        q = next(csv.reader(f))
    prompt = E.mcq_prompt("python_modules", data["python_modules"]["dev"][:2], q)
    assert prompt.startswith("The following are multiple choice questions (with answers) about python modules.")
    assert prompt.count("Answer:") == 3 and prompt.endswith(f"\nD. {q[4]}\nAnswer:")


class _AlwaysC(torch.nn.Module):
    """A fake LM whose last-position logits favour the token ' C': accuracy = share of C answers."""
    def __init__(self, c_id, vocab):
        super().__init__()
        self.c_id, self.vocab = c_id, vocab
        self.config = SimpleNamespace(max_position_embeddings=64)  # forces dropping shots

    def forward(self, input_ids):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.c_id] = 1.0
        return SimpleNamespace(logits=logits)


def test_mcq_scores_letter_logits_per_subject(tiny, tmp_path):
    _, tok = tiny
    folder = E.make_stdlib_mcq(tmp_path)
    c_id = tok.encode(" C", add_special_tokens=False)[-1]
    result = E.mcq_accuracy(_AlwaysC(c_id, len(tok)), tok, folder, k=5)
    data = E.read_mcq_dir(folder)
    expected = {s: sum(r[5] == "C" for r in d["test"]) / len(d["test"]) for s, d in data.items()}
    assert result["subjects"] == pytest.approx(expected)
    assert result["mean"] == pytest.approx(sum(expected.values()) / len(expected))  # unweighted
    assert result["n"] == sum(len(d["test"]) for d in data.values())


def _greedy(model, ids, n):
    """Greedy decoding by hand: append the argmax token n times (no KV cache, no generate())."""
    for _ in range(n):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@torch.no_grad()
def test_mcq_and_generation_on_a_real_model(tiny, tmp_path):
    model, tok = tiny
    folder = E.make_stdlib_mcq(tmp_path)
    res = E.mcq_accuracy(model, tok, folder, k=1, limit=4)
    letters = [tok.encode(" " + c, add_special_tokens=False)[-1] for c in "ABCD"]
    expected = {}
    for subject, split in E.read_mcq_dir(folder).items():   # score each question by hand
        hits = []
        for row in split["test"][:4]:
            text = E.mcq_prompt(subject, split["dev"][:1], row)
            ids = torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])
            logits = model(input_ids=ids).logits[0, -1]
            hits.append("ABCD"[int(logits[letters].argmax())] == row[5])
        expected[subject] = sum(hits) / len(hits)
    assert res["subjects"] == expected and res["n"] == 8
    question = "What does `json.dumps` do?"
    text = E.generate(model, tok, question, max_new_tokens=5)
    prompt = [tok.bos_token_id] + tok.encode(D.guanaco_prompt(question), add_special_tokens=False)
    ids = _greedy(model, torch.tensor([prompt]), 5)
    ref = tok.decode(ids[0, len(prompt):], skip_special_tokens=True).split("### Human")[0].strip()
    assert text == ref
    assert D.guanaco_prompt("q") == "### Human: q ### Assistant:"


def test_command_line(tmp_path, capsys):
    from qlora_mini import train as T
    folder = make_tiny_model(tmp_path / "m")
    T.main(["--model", str(folder), "--output", str(tmp_path / "run"), "--max-steps", "1",
            "--set", "lora_r=4", "--set", "max_eval_samples=2", "--no-progress"])
    capsys.readouterr()
    data = tmp_path / "qa.jsonl"                       # small data and test: a fast check
    data.write_text("".join(json.dumps({"input": r["question"], "output": r["answer"]}) + "\n"
                            for r in D.stdlib_qa()[:30]))
    mcq_dir = E.make_stdlib_mcq(tmp_path / "mcq")
    for f in (mcq_dir / "test").iterdir():
        f.write_text("".join(f.read_text().splitlines(keepends=True)[:3]))
    out = E.main(["--model", str(folder), "--adapter", str(tmp_path / "run" / "adapter"),
                  "--data", str(data), "--mcq", str(mcq_dir), "--k", "0",
                  "--ask", "What does `math.sqrt` do?"])
    model = E.load_for_eval(str(folder), tmp_path / "run" / "adapter")
    tok = __import__("transformers").AutoTokenizer.from_pretrained(folder)
    held = [D.tokenize_example(tok, r) for r in D.load_splits(str(data))[1]]
    assert len(held) == 3
    with torch.no_grad():  # token-weighted mean of transformers' per-example losses
        per = [(model(**D.collate([e], tok.pad_token_id)).loss.item(),
                sum(l != D.IGNORE_INDEX for l in e["labels"][1:])) for e in held]
    ref = sum(l * n for l, n in per) / sum(n for _, n in per)
    assert out["heldout"]["loss"] == pytest.approx(ref, rel=1e-4)
    subjects = out["mcq"]["subjects"]
    assert out["mcq"]["mean"] == pytest.approx(sum(subjects.values()) / len(subjects))
    assert out["mcq"]["n"] == 2 * 3
    assert list(out["answers"]) == ["What does `math.sqrt` do?"]
    with pytest.raises(SystemExit) as e:
        E.main(["--model", str(folder), "--mcq", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "no */test/*_test.csv files" in capsys.readouterr().err


def test_adapter_is_evaluated_on_the_base_its_run_trained_on(tmp_path, capsys):
    """A run on a non-default base of the shipped model (FP4 codes, no double quantization, the
    fp32 dtype policy): `python -m qlora_mini.evaluate --adapter RUN/adapter` rebuilds that base
    from RUN/config.yaml and evaluates the run's own held-out examples, so its held-out loss is the
    run's last logged eval loss. The same adapter on the default base (NF4, double quantization:
    what the command used to do) gives another loss, so the comparison can fail."""
    import shutil
    from qlora_mini import train as T
    from qlora_mini.data import pad_token_id
    from qlora_mini.default_model import DEFAULT_MODEL, load_tokenizer
    from qlora_mini.recipe import tokenized_splits
    out = tmp_path / "run"
    T.main(["--output", str(out), "--max-steps", "2", "--no-progress",
            *[a for kv in ("quant_type=fp4", "double_quant=false", "dtype_policy=fp32",
                           "compute_dtype=float32", "lora_r=4", "max_eval_samples=8",
                           "target_max_len=32", "gradient_accumulation_steps=1", "eval_steps=0",
                           "save_steps=0") for a in ("--set", kv)]])
    capsys.readouterr()
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    result = E.main(["--adapter", str(out / "adapter")])
    # Same codes, same adapter values (float32 on disk), same examples and batches, same process
    # and threads: the two forward passes run the same float32 kernels on the same inputs, so they
    # agree to the last bit here; 1e-6 relative leaves room for a summation order that another
    # build of the same model might take, and is far below what a wrong base changes (below).
    assert result["heldout"]["tokens"] == last["eval_tokens"]        # the same held-out examples
    assert result["heldout"]["loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
    assert E.run_config(out / "checkpoint-2" / "adapter") == E.run_config(out / "adapter")
    elsewhere = tmp_path / "elsewhere" / "adapter"            # no config.yaml beside it
    shutil.copytree(out / "adapter", elsewhere)
    cfg = E.run_config(out / "adapter")
    tok = load_tokenizer(DEFAULT_MODEL)
    held = tokenized_splits(cfg, tok)[1]
    wrong = E.eval_loss(E.load_for_eval(DEFAULT_MODEL, elsewhere), held, pad_token_id(tok))
    assert abs(wrong["loss"] - last["eval_loss"]) > 1e-3


def _evaluate(*args, env=None):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "qlora_mini.evaluate", *args], text=True,
                          capture_output=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.processes
@pytest.mark.parametrize("args, says", [
    (["--model", "/nonexistent"], "/nonexistent: no such folder"),
    (["--model", "nobody/nothing-here-9"], "nobody/nothing-here-9: not a local folder"),
    (["--k", "-1"], "--k: a number of shots, 0 or more"),
    (["--adapter", "/nonexistent/adapter"], "/nonexistent/adapter")])
def test_bad_arguments_give_one_line_and_status_2(args, says):
    run = _evaluate(*args, env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: ") and says in run.stderr


@pytest.mark.processes
@pytest.mark.parametrize("extra", [[], ["--data", "/nonexistent/data.jsonl"]])
def test_the_stdlib_test_leaves_no_temporary_folder(tmp_path, extra):
    """--mcq stdlib builds its test in a temporary folder, gone after a run and after a failure."""
    run = _evaluate("--mcq", "stdlib", "--k", "1", *extra, env={"TMPDIR": str(tmp_path)})
    assert run.returncode == (2 if extra else 0), run.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")]
