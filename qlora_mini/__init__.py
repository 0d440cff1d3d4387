"""qlora_mini: QLoRA from first principles (hand-written plumbing: the package's public names).

The chapter modules are generated from the notebooks (see CONTRIBUTING.md); this file only
gathers their public names at the top level.
"""
import logging as _logging

# bitsandbytes' CPU backend logs a harmless line about the optional `kernels` package on import.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"

from .quantization import dequantize_blockwise, quantize_blockwise  # noqa: E402  (chapter 1)
from .codebooks import get_code  # noqa: E402  (chapter 2)
from .storage import QuantState4bit, dequantize_4bit, quantize_4bit  # noqa: E402  (chapter 3)
from . import kernels  # noqa: E402  (chapter 4: registers the compiled paths with storage)
from .linear4bit import Linear4bit, linear4bit_nbytes, quantize_model  # noqa: E402  (chapter 5)
from .load4bit import load_4bit, save_4bit  # noqa: E402  (chapter 5: loading straight into 4 bits)
from .memory import (SavedTensors, activation_bytes, count_parameters,  # noqa: E402  (chapter 5)
                     full_finetune_memory, qlora_memory, saved_tensor_bytes)
from .model import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402  (chapter 6: the default model)
from .lora import LoRALinear, merge_qlora, prepare_qlora, trainable_parameters  # noqa: E402  (chapter 6)
from .lora import load_adapter, read_adapter, save_adapter  # noqa: E402  (chapter 6: adapter files)
from .policy import DTYPE_POLICIES, apply_dtype_policy  # noqa: E402  (chapter 6: the dtype policy)
from .paged import PagedAdamW  # noqa: E402  (chapter 7)
from .data import DEFAULT_DATA, load_splits, stdlib_qa  # noqa: E402  (chapter 8; train/evaluate are commands: python -m qlora_mini.train)
from .elo import bradley_terry, elo_tournament, win_rate_matrix  # noqa: E402  (chapter 9)
from .elo_data import load_paper_verdicts  # noqa: E402  (chapter 9; python -m qlora_mini.elo_generate)

__all__ = [
    "dequantize_blockwise", "quantize_blockwise", "get_code",
    "QuantState4bit", "dequantize_4bit", "quantize_4bit", "kernels",
    "Linear4bit", "linear4bit_nbytes", "quantize_model", "load_4bit", "save_4bit",
    "SavedTensors", "activation_bytes", "count_parameters", "full_finetune_memory",
    "qlora_memory", "saved_tensor_bytes",
    "DEFAULT_MODEL", "load_model", "load_tokenizer",
    "LoRALinear", "load_adapter", "merge_qlora", "prepare_qlora", "read_adapter", "save_adapter",
    "DTYPE_POLICIES", "apply_dtype_policy",
    "trainable_parameters", "PagedAdamW", "DEFAULT_DATA", "load_splits", "stdlib_qa",
    "bradley_terry", "elo_tournament", "win_rate_matrix", "load_paper_verdicts",
]
