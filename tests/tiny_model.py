"""A tiny LLaMA-architecture model + tokenizer saved to a folder, for fast train/evaluate tests."""
from pathlib import Path

import torch


def make_tiny_model(folder, vocab_size: int = 384, hidden: int = 64, layers: int = 2, seed: int = 0):
    """Save an untrained tiny LlamaForCausalLM and a byte-level BPE tokenizer (trained on the stdlib
    Q&A text) in `folder` with save_pretrained, so that from_pretrained loads both."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from qlora_mini.data import stdlib_qa
    folder = Path(folder)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["text"] for r in stdlib_qa()] + ["A B C D Answer:"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def train_args(model, out, *extra) -> list:
    """`python -m qlora_mini.train` arguments for a 4-step run of the tiny model: checkpoints at
    steps 2 and 4, small batches and targets (the train and fault tests share them)."""
    return ["--config", "default", "--model", str(model), "--output", str(out), "--max-steps", "4",
            "--set", "save_steps=2", "--set", "eval_steps=0", "--set", "max_eval_samples=4",
            "--set", "per_device_train_batch_size=2", "--set", "target_max_len=32",
            "--set", "lora_r=4", "--set", "gradient_accumulation_steps=2", "--no-progress", *extra]
