"""Inspect model and adapter directories without loading them: the provider's checks before an upload.

Reads config.json, safetensors headers (8-byte length + JSON; no torch) and adapter_config.json, so the
provider can refuse a corrupt model or an adapter that does not fit its base with a clear message, and
report architecture and parameter count, while importing neither torch nor the runtime.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ember.provider.domain import file_kinds
from ember.provider.domain.families import (NOT_SERVED, SUPPORTED_ARCHITECTURES, expert_count, expert_layers,
                                            expert_parameter_shapes, family, module_shapes)
from ember.provider.domain.spec import LoRAConfig, SpecError, parse

# RoPE variants the runtime computes: Llama 3.1's, linear (Gemma 3's global layers), LongRoPE (Phi-3)
ROPE_TYPES = ("default", "llama3", "linear", "longrope")
# Read by the runtime when present; each must then be a regular file like the required ones.
OPTIONAL_TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                            "special_tokens_map.json")
MAX_HEADER = 100 * 1024 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


class ModelFilesError(ValueError):
    """A model or adapter directory that cannot be served; the message names the file and the problem."""


def require_file(path: Path, missing: str = "is missing") -> None:
    """Refuse what is not a regular file before anything opens it (a FIFO would block forever), naming it."""
    problem = file_kinds.problem(path)
    if problem is not None:
        raise ModelFilesError(f"{path} {missing if problem == file_kinds.MISSING else problem}")


def require_directory(path: Path) -> None:
    problem = file_kinds.problem(path, "directory")
    if problem is not None:
        raise ModelFilesError(f"{path} {problem}")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: tensor name → {dtype, shape, data_offsets}."""
    require_file(path)
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelFilesError(f"{path} is truncated: no safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER:
                raise ModelFilesError(f"{path}: header length {length} is implausible (corrupt file?)")
            header = json.loads(f.read(length))
            size = path.stat().st_size
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{path} is not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFilesError(f"{path}: the safetensors header is {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    for name, tensor in header.items():
        _check_tensor_entry(path, name, tensor)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + length + end > size:
        raise ModelFilesError(f"{path} is truncated: its header promises {8 + length + end} bytes, the file has {size}")
    return header


def _check_tensor_entry(path: Path, name: str, tensor) -> None:
    """One header entry must describe a real tensor: a header that lies is refused before anything reads it."""
    if not isinstance(tensor, dict):
        raise ModelFilesError(f"{path}: tensor {name!r} has entry {tensor!r}, not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = tensor.get("dtype"), tensor.get("shape"), tensor.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ModelFilesError(f"{path}: tensor {name!r} has dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ModelFilesError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ModelFilesError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
        raise ModelFilesError(f"{path}: tensor {name!r} is {shape} {dtype} ({numel * DTYPE_BYTES[dtype]} bytes), "
                              f"but its data_offsets {offsets} span {offsets[1] - offsets[0]}")


@dataclass(frozen=True)
class BaseModelInfo:
    architecture: str
    parameter_count: int
    config: dict  # config.json


def rope_settings(config: dict) -> dict:
    # transformers >= 5 nests RoPE settings under rope_parameters; older configs keep them top-level.
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def read_config(directory: str | Path) -> dict:
    """A model directory's config.json, or an error naming the file."""
    path = Path(directory) / "config.json"
    require_file(path, "is missing: a Hugging Face model directory needs config.json")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFilesError(f"{path} is missing: a Hugging Face model directory needs config.json") from None
    except json.JSONDecodeError as exc:
        raise ModelFilesError(f"{path} is not valid JSON: {exc}") from None


def check_config(config: dict, source: str | Path = "config.json") -> None:
    """Everything in a config.json that Ember cannot serve, refused with the key and its value: the provider
    runs it at preview, the runtime before it builds the model, so the two never disagree."""
    architecture = (config.get("architectures") or [None])[0]
    if architecture in NOT_SERVED:
        raise ModelFilesError(f"{source}: architectures {config.get('architectures')!r}: {NOT_SERVED[architecture]}")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelFilesError(f"{source}: architectures {config.get('architectures')!r} is not supported; "
                              f"Ember serves {', '.join(SUPPORTED_ARCHITECTURES)}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelFilesError(f"{source}: {key} must be a positive int, got {value!r}")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if not config.get("head_dim") and config["hidden_size"] % heads:
        raise ModelFilesError(f"{source}: hidden_size {config['hidden_size']} is not divisible by "
                              f"num_attention_heads {heads}")
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ModelFilesError(f"{source}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads!r}")
    f = family(config)
    activation_key, served = ("hidden_activation", "gelu_pytorch_tanh") if f.gemma else ("hidden_act", "silu")
    activation = config.get(activation_key) or served
    if activation != served:
        raise ModelFilesError(f"{source}: {activation_key} {activation!r} is not supported for {architecture}")
    window = config.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ModelFilesError(f"{source}: sliding_window must be a positive int or null, got {window!r}")
    if config.get("use_bidirectional_attention"):
        raise ModelFilesError(f"{source}: use_bidirectional_attention is not supported (a decoder attends causally)")
    for rope in rope_variants(config):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ModelFilesError(f"{source}: rope_type {kind!r} is not supported ({', '.join(ROPE_TYPES)})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelFilesError(f"{source}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported "
                                  f"(RoPE over the whole head only)")
    if f.experts is not None:
        experts, used = expert_count(config), config.get("num_experts_per_tok")
        if not isinstance(experts, int) or not isinstance(used, int) or not 1 <= used <= experts:
            raise ModelFilesError(f"{source}: a Mixture-of-Experts model needs 1 <= num_experts_per_tok <= its experts, "
                                  f"got {used!r} of {experts!r}")


def rope_variants(config: dict) -> list[dict]:
    """The RoPE settings of a config.json: one, or one per layer type (Gemma 3 in transformers >= 5)."""
    rope = rope_settings(config)
    nested = [v for k, v in rope.items() if k in ("full_attention", "sliding_attention") and isinstance(v, dict)]
    return nested or [rope]


def inspect_base_model(directory: str | Path) -> BaseModelInfo:
    directory = Path(directory)
    require_directory(directory)
    config = read_config(directory)
    check_config(config, directory / "config.json")
    require_file(directory / "tokenizer.json", "is missing: a model directory needs tokenizer.json")
    for name in OPTIONAL_TOKENIZER_FILES:
        if file_kinds.present(directory / name):
            require_file(directory / name)
    index = directory / "model.safetensors.index.json"
    if file_kinds.present(index):
        require_file(index)
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFilesError(f"{index} is not a safetensors index: {exc}") from None
    elif file_kinds.present(directory / "model.safetensors"):
        files = ["model.safetensors"]
    else:
        raise ModelFilesError(f"{directory} has no model.safetensors or model.safetensors.index.json")
    headers: dict = {}  # every tensor of every shard, read once
    for name in files:
        headers |= safetensors_header(directory / name)
    count = 0
    for tensor in headers.values():
        n = 1
        for dim in tensor["shape"]:
            n *= dim
        count += n
    hidden = config.get("hidden_size")
    embed_shape = headers.get("model.embed_tokens.weight", {}).get("shape")
    if embed_shape is not None and embed_shape != [config.get("vocab_size"), hidden]:
        raise ModelFilesError(f"{directory}: model.embed_tokens.weight has shape {embed_shape}, but config.json says "
                              f"[{config.get('vocab_size')}, {hidden}]")
    for module, (fan_in, fan_out) in module_shapes(config).items():  # layer 0 stands for all: a config that lies
        part = "self_attn" if module in ATTENTION_MODULES else "mlp"
        key = f"model.layers.0.{part}.{module}.weight"
        if key in headers and headers[key]["shape"] != [fan_out, fan_in]:
            raise ModelFilesError(f"{directory}: {key} has shape {headers[key]['shape']}, but config.json says "
                                  f"[{fan_out}, {fan_in}]")
    return BaseModelInfo(config["architectures"][0], count, config)


ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.default)?\.weight$")
# PEFT's LoRA on a layer's experts parameter: one wrapper per targeted parameter, nested (`base_layer.` per level);
# A is [experts * r, in], B [out, r * experts]. Which parameter a level is, its shapes say.
_EXPERTS_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)"
                          r"lora_(A|B)(?:\.default)?\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    config: LoRAConfig
    weights: Path
    keys: dict[tuple[int, str, str], str]  # (layer, module, "A" | "B") → tensor name in the file

    @property
    def rank(self) -> int:
        return self.config.r

    @property
    def target_modules(self) -> tuple[str, ...]:
        return self.config.target_modules


def inspect_adapter(directory: str | Path, base_config: dict | None, max_rank: int | None = None) -> AdapterInfo:
    """Check a PEFT adapter against its base model's config.json, from headers alone: the provider runs it
    before an upload, the runtime before it reads a tensor. Without the base's config (a preview whose base
    model is elsewhere) the adapter is checked on its own."""
    directory = Path(directory)
    config_path, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    require_directory(directory)
    require_file(config_path, "is missing: a PEFT adapter needs adapter_config.json")
    try:
        raw = json.loads(config_path.read_text())
        config = parse(LoRAConfig, raw)
    except json.JSONDecodeError as exc:
        raise ModelFilesError(f"{config_path} is not valid JSON: {exc}") from None
    except SpecError as exc:
        raise ModelFilesError(f"{config_path}: " + "; ".join(f"{f}: {m}" for f, m in exc.errors)) from None
    for field in ("lora_bias", "use_dora"):
        if raw.get(field):
            raise ModelFilesError(f"{config_path}: {field}={raw[field]!r} is not supported")
    if max_rank is not None and config.r > max_rank:
        raise ModelFilesError(f"{config_path}: rank r={config.r} is above the deployment's max_lora_rank {max_rank}")
    require_file(weights, "is missing: a PEFT adapter needs adapter_model.safetensors")
    header = safetensors_header(weights)
    if base_config is None:
        return AdapterInfo(config, weights, {})
    shapes = module_shapes(base_config)
    layers = base_config["num_hidden_layers"]
    absent = [m for m in config.target_modules if m not in shapes]
    if absent:
        raise ModelFilesError(f"{config_path}: target_modules {absent!r} are not modules a "
                              f"{base_config['architectures'][0]} serves addons on; use any of {', '.join(shapes)}")
    seen: dict[tuple[int, str, str], str] = {}
    nested: dict[tuple[int, str], dict[str, tuple[str, list]]] = {}  # (layer, level) → A/B → (key, shape)
    for key, tensor in header.items():
        expert_match = _EXPERTS_KEY.match(key)
        if expert_match and config.target_parameters:
            nested.setdefault((int(expert_match[1]), expert_match[2]), {})[expert_match[3]] = (key, tensor["shape"])
            continue
        match = _KEY.match(key)
        if not match or match[2] not in shapes:
            raise ModelFilesError(f"{weights}: tensor {key} is not a LoRA weight of a module Ember serves addons on "
                                  f"for {base_config['architectures'][0]} ({', '.join(shapes)})")
        layer, module, which = int(match[1]), match[2], match[3]
        if layer >= layers:
            raise ModelFilesError(f"{weights}: tensor {key} is for layer {layer}, but the base model has {layers}")
        if module not in config.target_modules:
            raise ModelFilesError(f"{weights}: tensor {key} is for {module}, which target_modules does not list")
        fan_in, fan_out = shapes[module]
        expected = [config.r, fan_in] if which == "A" else [fan_out, config.r]
        if tensor["shape"] != expected:
            raise ModelFilesError(f"{weights}: tensor {key} has shape {tensor['shape']}, but the base model needs "
                                  f"{expected}: the adapter does not fit its base model")
        seen[(layer, module, which)] = key
    seen |= _expert_keys(config, base_config, nested, weights)
    wanted = [(l, m) for l in range(layers) for m in config.target_modules]
    wanted += [(l, p) for l, sparse in enumerate(expert_layers(base_config)) if sparse for p in config.target_parameters]
    missing = [(l, m, w) for l, m in wanted for w in "AB" if (l, m, w) not in seen]
    if missing:
        raise ModelFilesError(f"{weights}: {len(missing)} LoRA weights are missing, e.g. layer {missing[0][0]} "
                              f"{missing[0][1]}.lora_{missing[0][2]}")
    return AdapterInfo(config, weights, seen)


def _expert_keys(config: LoRAConfig, base_config: dict, nested: dict, weights: Path) -> dict[tuple[int, str, str], str]:
    """Each (layer, expert parameter, A or B) → its tensor, from PEFT's nested expert wrappers, every shape checked."""
    shapes, experts = expert_parameter_shapes(base_config), expert_count(base_config)
    sparse = expert_layers(base_config)
    absent = [p for p in config.target_parameters if p not in shapes]
    if absent:
        raise ModelFilesError(f"{weights.parent / 'adapter_config.json'}: target_parameters {absent!r} are not "
                              f"experts a {base_config['architectures'][0]} has")
    seen = {}
    for (layer, _), pair in sorted(nested.items()):
        (a_key, a_shape), (b_key, b_shape) = pair.get("A", (None, None)), pair.get("B", (None, None))
        if a_key is None or b_key is None:
            raise ModelFilesError(f"{weights}: tensor {a_key or b_key} has no lora_{'B' if b_key is None else 'A'} "
                                  f"beside it")
        if layer >= len(sparse) or not sparse[layer]:
            raise ModelFilesError(f"{weights}: tensor {a_key} is for the experts of layer {layer}, which has none")
        found = next((p for p in config.target_parameters if shapes[p] == (a_shape[-1], b_shape[0])), None)
        width = experts * config.r
        if found is None or a_shape != [width, shapes[found][0]] or b_shape != [shapes[found][1], width]:
            expected = " or ".join(f"{p}: A [{width}, {i}] and B [{o}, {width}]"
                                   for p, (i, o) in shapes.items() if p in config.target_parameters)
            raise ModelFilesError(f"{weights}: tensors {a_key} {a_shape} and {b_key} {b_shape} are not LoRA of the "
                                  f"{experts} experts at r={config.r} the base model needs ({expected}): the adapter "
                                  f"does not fit its base model")
        if (layer, found, "A") in seen:
            raise ModelFilesError(f"{weights}: layer {layer}'s {found} has LoRA weights twice ({a_key})")
        seen[(layer, found, "A")], seen[(layer, found, "B")] = a_key, b_key
    return seen
