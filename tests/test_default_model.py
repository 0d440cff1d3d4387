"""The embedded default model: built from the stdlib, cached, loaded with from_pretrained; the
shipped weights, found by their recipe and checked against their checksums.

A tiny recipe (a few dozen files, 2 layers of width 64, 20 steps) keeps these fast; the real
default model ships with the package (Appendix A)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from qlora_mini import default_model as M

TINY_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
TINY_TRAIN = dict(steps=20, batch_size=4, seq_len=32, max_files=40)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return M.default_model_dir(TINY_MODEL, TINY_TRAIN, root=tmp_path_factory.mktemp("cache"),
                               progress=False)


def test_corpus_split_is_fixed_and_disjoint():
    train, heldout = M.stdlib_corpus(max_files=200)
    assert len(train) > 150 and len(heldout) >= 1
    assert (train, heldout) == M.stdlib_corpus(max_files=200)
    assert not set(train) & set(heldout)


def test_cached_dir_has_transformers_files(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretraining.json"} <= names
    leftovers = [p.name for p in tiny_dir.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert not leftovers, f"atomic_dir left temporary folders behind: {leftovers}"
    info = json.loads((tiny_dir / "pretraining.json").read_text())
    assert len(info["losses"]) == TINY_TRAIN["steps"] and info["losses"][-1] < info["losses"][0]
    # a second call finds the cache instead of training again
    assert M.default_model_dir(TINY_MODEL, TINY_TRAIN, root=tiny_dir.parent) == tiny_dir


def test_loads_with_from_pretrained_and_generates(tiny_dir):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    model = M.load_model(tiny_dir, dtype=torch.float32)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == 64 and model.dtype == torch.float32
    tok = M.load_tokenizer(tiny_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tok("def main():\n", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids["input_ids"].shape[1] + 8)
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)
    same = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert torch.equal(same.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_tokenizer_round_trips_any_text(tiny_dir):
    tok = M.load_tokenizer(tiny_dir)
    text = "λ = 'ünïcode' \t\n  # émoji 🐍"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_training_is_deterministic():
    train, _ = M.stdlib_corpus(max_files=20)
    tok = M.train_tokenizer(train, 300)
    assert tok.get_vocab() == M.train_tokenizer(train, 300).get_vocab()
    ids = M.token_stream(tok, train)
    cfg = dict(steps=5, batch_size=2, seq_len=16)
    m1, l1 = M.pretrain(tok, ids, TINY_MODEL, cfg, progress=False)
    m2, l2 = M.pretrain(tok, ids, TINY_MODEL, cfg, progress=False)
    assert l1 == l2
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_default_name_resolves_locally(monkeypatch, tmp_path):
    monkeypatch.setattr(M, "default_model_dir", lambda: tmp_path)
    assert M.resolve(M.DEFAULT_MODEL) == tmp_path
    assert M.resolve("huggyllama/llama-7b") == "huggyllama/llama-7b"


def test_heldout_perplexity_is_finite_and_beats_uniform(tiny_dir):
    model, tok = M.load_model(tiny_dir, dtype=torch.float32), M.load_tokenizer(tiny_dir)
    _, heldout = M.stdlib_corpus(max_files=40)
    ppl = M.heldout_perplexity(model, tok, heldout, seq_len=32, max_tokens=2048)
    assert 1 < ppl < len(tok)


def test_concurrent_callers_build_once(monkeypatch, tmp_path):
    """The build lock: a second caller waits for the first one's model instead of training again."""
    import threading
    import time
    calls = []

    def fake_build(final, *args):
        calls.append(final)
        time.sleep(0.5)
        final.mkdir()
        (final / "config.json").write_text("{}")

    monkeypatch.setattr(M, "_build", fake_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        M.default_model_dir(TINY_MODEL, TINY_TRAIN, root=tmp_path, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]


def test_failed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "pretrain", boom)
    with pytest.raises(KeyboardInterrupt):
        M.default_model_dir(TINY_MODEL, TINY_TRAIN, root=tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def shipped_sums() -> dict:
    """{folder: {file name: sha256}} from each shipped folder's SHA256SUMS (sha256sum's format)."""
    return {folder: dict(line.split()[::-1] for line in (folder / "SHA256SUMS").read_text().splitlines())
            for folder in sorted(p.parent for p in M.SHIPPED.glob("*/SHA256SUMS"))}


def test_shipped_weights_match_their_checksums():
    sums = shipped_sums()
    assert sums, "no shipped weights"
    for folder, files in sums.items():
        assert sorted(files) == sorted(p.name for p in folder.iterdir() if p.name != "SHA256SUMS")
        for name, sha in files.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha, (folder, name)
        assert M.weights_sha256(folder) == files["model.safetensors"]


def test_default_model_is_the_shipped_one_never_built(monkeypatch):
    def no_build(*args):
        raise AssertionError("built instead of loading the shipped weights")
    monkeypatch.setattr(M, "_build", no_build)
    folder = M.default_model_dir()
    assert folder.parent == M.SHIPPED and folder in shipped_sums()
    recipe = json.loads((folder / "pretraining.json").read_text())
    assert (recipe["model_config"], recipe["train_config"]) == (M.MODEL_CONFIG, M.TRAIN_CONFIG)
    assert M.resolve(M.DEFAULT_MODEL) == folder
    assert M.shipped_model_dir(train_config=dict(seed=1)) is None      # another recipe: not shipped


def test_shipped_false_builds_the_recipe_anyway(monkeypatch, tmp_path):
    built = []

    def fake_build(final, *args):
        built.append(final)
        final.mkdir()
        (final / "config.json").touch()
    monkeypatch.setattr(M, "_build", fake_build)
    folder = M.default_model_dir(root=tmp_path, shipped=False, progress=False)
    assert built == [folder] and folder.parent == tmp_path



RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_every_result_names_its_weights():
    """Every committed results JSON names the sha256 of the weights it used; where those weights
    are shipped (a model folder of the same name), the name is the shipped file's."""
    shipped = {folder.name: files["model.safetensors"] for folder, files in shipped_sums().items()}
    files = sorted(RESULTS.rglob("*.json"))
    assert files
    for path in files:
        result = json.loads(path.read_text())
        if "rebuilds" in result:                        # Appendix A's rebuild records
            assert result["shipped"]["weights_sha256"] in shipped.values(), path
            names = [r["weights_sha256"] for r in result["rebuilds"].values()]
        else:
            names = [result["weights_sha256"]]
        assert names and all(isinstance(n, str) and len(n) == 64 for n in names), path
        if result.get("model_dir") in shipped:
            assert result["weights_sha256"] == shipped[result["model_dir"]], path
