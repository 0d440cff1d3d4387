"""qlora_mini: QLoRA from first principles (hand-written plumbing: the package's public names).

The chapter modules are generated from the notebooks (see CONTRIBUTING.md); this file only
gathers their public names at the top level. They load on first use (PEP 562, as transformers
does), so `python -m qlora_mini.train` does not pay for pandas and the Elo chapter.
"""
import importlib
import importlib.util
import logging as _logging

# bitsandbytes' CPU backend logs a harmless line about the optional `kernels` package on import.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"


_EXPORTS = {  # module (in chapter order) -> the public names it gives the package
    "quantization": ["dequantize_blockwise", "quantize_blockwise"],               # chapter 1
    "codebooks": ["get_code"],                                                    # chapter 2
    "storage": ["QuantState4bit", "dequantize_4bit", "quantize_4bit"],            # chapter 3
    "linear4bit": ["Linear4bit", "linear4bit_nbytes", "quantize_model"],          # chapter 5
    "load4bit": ["load_4bit", "save_4bit"],
    "memory": ["SavedTensors", "activation_bytes", "count_parameters", "full_finetune_memory",
               "qlora_memory", "saved_tensor_bytes"],
    "default_model": ["DEFAULT_MODEL", "load_model", "load_tokenizer"],           # appendix A
    "lora": ["LoRALinear", "load_adapter", "merge_qlora", "prepare_qlora", "read_adapter",
             "save_adapter", "trainable_parameters"],                             # chapter 6
    "dtype_policy": ["DTYPE_POLICIES", "apply_dtype_policy"],
    "paged": ["PagedAdamW"],                                                      # chapter 7
    "data": ["DEFAULT_DATA", "load_splits", "stdlib_qa"],  # chapter 8 (train/evaluate: commands)
    "studies.elo": ["bradley_terry", "elo_tournament", "win_rate_matrix"],        # chapter 9
    "studies.elo_data": ["load_paper_verdicts"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_WHERE)


def __getattr__(name: str):
    """Import the chapter module that defines `name` on first use, then cache the name here; a
    submodule's name (`qlora_mini.paged`) imports that submodule, as an eager package would."""
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'qlora_mini' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
