"""Build, load and save the reference models.

`load_model("tiny-llama")` / `load_model("tiny-qwen3-next")` build a tiny model with
seeded random weights (no download, bit-identical for a seed). `load_model(path)` loads
a local Hugging Face directory (config.json + *.safetensors + tokenizer.json), and
`save_model` writes one, so a tiny model round-trips through the HF layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Union, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..arrays import tree_items
from . import llama, qwen3_next

PathLike = Union[str, "os.PathLike[str]"]

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 261,  # exactly the ByteTokenizer ids, so every sampled id decodes
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}

TINY_QWEN3_NEXT: dict[str, Any] = {
    "model_type": "qwen3_next",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "full_attention_interval": 4,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-6,
    "vocab_size": 261,  # exactly the ByteTokenizer ids, so every sampled id decodes
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "linear_conv_kernel_dim": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
}

MODELS: dict[str, tuple[ModuleType, dict[str, Any]]] = {
    "tiny-llama": (llama, TINY_LLAMA),
    "tiny-qwen3-next": (qwen3_next, TINY_QWEN3_NEXT),
}

FAMILIES: dict[str, ModuleType] = {"llama": llama, "qwen3_next": qwen3_next}

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Tiny random models: decay rates A = exp(A_log) in [0.05, 1], so the delta state
# remembers over a few to tens of tokens.
_A_RANGE = (0.05, 1.0)


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """An (unloaded) model for an HF `config.json` dict, chosen by its `model_type`."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}: kvtrie's reference models cover "
            f"{sorted(FAMILIES)}; use mlx-lm (kvtrie.integrations) for other architectures"
        )
    module = FAMILIES[model_type]
    return module.Model(module.ModelArgs.from_dict(config))


def init_random_weights(model: nn.Module, seed: int) -> nn.Module:
    """Give `model` seeded random weights (in place): same seed, bit-identical weights.

    Every weight with ndim >= 2 gets N(0, 1/fan_in), fan_in being its last axis (the
    input features of a Linear, the width of the embedding, the taps of the conv):
    activations keep unit scale, so the layers rather than the token embedding shape
    the logits (std ~1) and greedy outputs depend on the context. `A_log` gets the log
    of uniform decay rates, biases 0; norm weights and `dt_bias` keep their constructor
    values.
    """
    params = sorted(tree_items(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for (name, p), key in zip(params, keys):
        if p.ndim >= 2:
            p = mx.random.normal(p.shape, p.dtype, key=key) * p.shape[-1] ** -0.5
        elif name.endswith("A_log"):
            p = mx.log(mx.random.uniform(*_A_RANGE, p.shape, key=key)).astype(p.dtype)
        elif name.endswith(".bias"):
            p = mx.zeros_like(p)
        new.append((name, p))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


def _config_dtype(config: dict[str, Any]) -> mx.Dtype:
    name = config.get("torch_dtype", config.get("dtype")) or "float32"
    if name not in _DTYPES:
        raise ValueError(f"config dtype {name!r} is not supported; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_model(name_or_path: Union[str, PathLike], seed: int = 0) -> tuple[nn.Module, Any]:
    """`(model, tokenizer)` for a bundled tiny model name or a local Hugging Face directory.

    Names in `MODELS` build seeded random weights and pair with `ByteTokenizer`; a
    directory loads `config.json`, every `*.safetensors` (strictly: missing, extra or
    misshapen tensors raise) in the config's dtype, and its tokenizer.
    """
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        from .tokenizer import ByteTokenizer

        _, config = MODELS[name_or_path]
        return init_random_weights(model_from_config(config), seed), ByteTokenizer()

    path = Path(name_or_path)
    if not path.is_dir():
        raise ValueError(
            f"unknown model {str(name_or_path)!r}: expected one of {sorted(MODELS)} or a local "
            "Hugging Face directory with config.json and *.safetensors"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face model directory?")
    config = json.loads(config_file.read_text())
    model = model_from_config(config)
    dtype = _config_dtype(config)

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weight files")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(cast(dict[str, mx.array], mx.load(str(file))))  # (a .safetensors file: a dict)
    weights = model.sanitize(weights)
    model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())

    from .tokenizer import load_tokenizer

    return model, load_tokenizer(path)


def save_model(model: nn.Module, path: PathLike, tokenizer: Any = None) -> None:
    """Write `model` as a Hugging Face directory: config.json + model.safetensors.

    The parameters already carry HF names, shapes and conventions, so they are written
    unchanged. An `HFTokenizer` is copied along (tokenizer.json and its config files); a
    `ByteTokenizer` needs no files, since `load_model` falls back to it.
    """
    from .tokenizer import ByteTokenizer, HFTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_items(model.parameters()))
    dtype = weights["model.embed_tokens.weight"].dtype
    dtype_name = next((n for n, d in _DTYPES.items() if d == dtype), None)
    if dtype_name is None:
        raise ValueError(f"cannot save a model in dtype {dtype}; cast it to one of {sorted(_DTYPES)}")
    config = {
        "model_type": model.model_type,
        "architectures": [model.architecture],
        **model.args.to_dict(),
        "torch_dtype": dtype_name,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})

    if isinstance(tokenizer, HFTokenizer):
        source = tokenizer.path.parent
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (source / name).is_file() and source.resolve() != path.resolve():
                shutil.copyfile(source / name, path / name)
    elif tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
        raise TypeError(f"cannot save a {type(tokenizer).__name__}; pass an HFTokenizer, a ByteTokenizer or None")
