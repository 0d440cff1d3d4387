"""Adapter files under bad input (chapter 6): every bad file or argument is an error that names
it, raised before the model changes; nothing non-finite is ever written."""
import json
import math

import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file

from qlora_mini.lora import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter, save_adapter
from qlora_mini.lora import LoRALinear, lora_layers, prepare_qlora  # noqa: E402

F32 = torch.float32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def fresh(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=F32)


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory):
    model = prepare_qlora(fresh(model_dir), r=4, compute_dtype=F32, gradient_checkpointing=False)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_()
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a")


def snapshot(model):
    return ({n: type(m).__name__ for n, m in model.named_modules()},
            {n: t.clone() for n, t in model.state_dict().items()})


def assert_unchanged(model, before):
    types, tensors = snapshot(model)
    assert types == before[0]
    assert tensors.keys() == before[1].keys()
    assert all(torch.equal(tensors[k], before[1][k]) for k in tensors)


def copy(adapter, tmp_path):
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (tmp_path / name).write_bytes((adapter / name).read_bytes())
    return tmp_path


def test_good_adapter_loads(model_dir, adapter):
    model = load_adapter(fresh(model_dir), adapter, compute_dtype=F32, gradient_checkpointing=False)
    ref = load_file(adapter / WEIGHTS_FILE)
    for name, m in lora_layers(model).items():
        assert torch.equal(m.lora_B.weight, ref[f"base_model.model.{name}.lora_B.weight"])


def _truncate(d):
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _nan_bytes(d):
    tensors = load_file(d / WEIGHTS_FILE)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, d / WEIGHTS_FILE)


def _overwrite_bytes(d):  # the last 64 bytes (data of the last tensor) become 0xFF: NaNs
    data = bytearray((d / WEIGHTS_FILE).read_bytes())
    data[-64:] = b"\xff" * 64
    (d / WEIGHTS_FILE).write_bytes(bytes(data))


def _config(**change):
    def edit(d):
        cfg = json.loads((d / CONFIG_FILE).read_text())
        for k, v in change.items():
            if v is KeyError:
                del cfg[k]
            else:
                cfg[k] = v
        (d / CONFIG_FILE).write_text(json.dumps(cfg))
    return edit


def _bad_json(d):
    (d / CONFIG_FILE).write_text('{"r": 4,')


CASES = {"truncated": (_truncate, WEIGHTS_FILE, "not a readable safetensors"),
         "nan": (_nan_bytes, WEIGHTS_FILE, "non-finite"),
         "overwritten": (_overwrite_bytes, WEIGHTS_FILE, "non-finite"),
         "r mismatch": (_config(r=8), WEIGHTS_FILE, "rank 4 but adapter_config.json says r=8"),
         "r zero": (_config(r=0), CONFIG_FILE, "r must be a positive int"),
         "r missing": (_config(r=KeyError), CONFIG_FILE, "missing r"),
         "alpha nan": (_config(lora_alpha=float("nan")), CONFIG_FILE, "alpha"),
         "bad json": (_bad_json, CONFIG_FILE, "not valid JSON"),
         "dora": (_config(use_dora=True), CONFIG_FILE, "only plain LoRA")}


@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_files_name_the_file_and_change_nothing(model_dir, adapter, tmp_path, case):
    damage, culprit, message = CASES[case]
    damage(copy(adapter, tmp_path))
    model = fresh(model_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as err:
        load_adapter(model, tmp_path)
    assert str(tmp_path / culprit) in str(err.value)
    assert_unchanged(model, before)


def test_missing_folder_or_file(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        read_adapter(tmp_path / "nowhere")


def test_shape_mismatch_with_a_prepared_model_changes_nothing(model_dir, adapter):
    model = prepare_qlora(fresh(model_dir), r=8, compute_dtype=F32, gradient_checkpointing=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="wrong shape"):
        load_adapter(model, adapter)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kw, error", [(dict(r=True), TypeError), (dict(r=2.0), TypeError),
                                       (dict(r=0), ValueError), (dict(alpha=-16), ValueError),
                                       (dict(alpha=math.nan), ValueError),
                                       (dict(alpha="16"), TypeError),
                                       (dict(dropout=-0.1), ValueError),
                                       (dict(dropout=1.0), ValueError)])
def test_bad_lora_arguments_are_refused_before_any_change(model_dir, kw, error):
    model = fresh(model_dir)
    before = snapshot(model)
    with pytest.raises(error, match=next(iter(kw))):
        prepare_qlora(model, **kw)
    assert_unchanged(model, before)
    with pytest.raises(error):
        LoRALinear(nn.Linear(4, 4), **kw)


def test_model_without_linear_layers_is_an_error():
    with pytest.raises(ValueError, match="matched no"):
        prepare_qlora(nn.Sequential(nn.Embedding(4, 4)))


def test_non_finite_adapters_are_never_written(model_dir, tmp_path):
    model = prepare_qlora(fresh(model_dir), r=4, compute_dtype=F32, gradient_checkpointing=False)
    with torch.no_grad():
        next(iter(lora_layers(model).values())).lora_A.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
