"""Every family transformers ships, built tiny by generic config rules (random weights, no download).

``registry_families()`` reads transformers' own auto registries (causal LM, masked LM,
encoder-decoder LM, image classification, sequence classification) and returns one entry per model
type: the class of the first registry, in that order, that holds it. ``build(name)`` builds it tiny:

1. the config class's defaults are read (``config_cls()``), sub-configs included;
2. every size-like field found there is shrunk by one table of name rules (hidden 64, MLP 128,
   3 layers, 4 heads, 2 kv heads, head_dim 16, 4 experts of which 2 per token, vocab 99, 128
   positions, 32-pixel images) and, generically, every other integer field whose default equals
   the default hidden or MLP width; lists with one entry per layer keep their first 3, lists of
   stage widths and depths shrink entry by entry; special token ids move into the tiny vocab;
3. only the changed fields are passed to the config class (sub-configs as dicts of their
   changes), so that what the class derives from them (per-layer type lists) is derived anew.

``inputs(model, batch, seq, seed)`` makes the positional inputs the class's ``forward`` needs:
token ids, or images of the config's size, and decoder token ids for an encoder-decoder; an
input it cannot make is a ``BuildError`` naming it. A family whose tiny model does not build is
never skipped: ``build`` raises ``BuildError`` with the one-line reason and the sweep lists it.
"""
from __future__ import annotations

import inspect
import re
import warnings

import torch

__all__ = ["registry_families", "build", "inputs", "tiny_config_changes", "BuildError", "RegistryFamily",
           "is_sequence_fixed"]

TASKS = (("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
         ("masked_lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
         ("seq2seq_lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
         ("image_classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
         ("sequence_classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"))

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 99, 64, 128, 3, 4, 2, 16
EXPERTS, PER_TOKEN, EXPERT_FFN, POSITIONS, IMAGE = 4, 2, 32, 128, 32

# (pattern on the field name, new value from the default): the size-like fields of config classes
_COUNTS = [
    (r"(num_hidden_layers|n_layers?|num_layers|(en|de)coder_layers|num_(en|de)coder_layers|n_layer)", LAYERS),
    (r"(num_key_value_heads|num_kv_heads|n_kv_heads?|multi_query_group_num|num_key_value_groups)", None),  # below
    (r"(num_attention_heads|n_heads?|num_heads|(en|de)coder_attention_heads|attention_heads)", HEADS),
    (r"(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_experts_total)", EXPERTS),
    (r"(num_experts_per_tok|moe_topk|num_selected_experts|top_k|moe_k)", PER_TOKEN),
    (r"(n_shared_experts|num_shared_experts)", 1),
    (r"(n_group|topk_group)", 1),
    # which layers are of which kind (every n-th attention): still every kind within 3 layers
    (r"\w*_(interval|period)", 2),
    (r"\w*_layer_offset", 1),
]
_WIDTHS = [
    (r"(moe_intermediate_size|expert_intermediate_size|shared_expert_intermediate_size|moe_ffn_hidden_size)",
     EXPERT_FFN),
    (r"(intermediate_size|ffn_dim|n_inner|d_ff|ffn_hidden_size|(en|de)coder_ffn_dim|mlp_dim|inner_dim)", FFN),
    (r"(hidden_size|d_model|n_embd|embed_dim|model_dim|dim|word_embed_proj_dim|embedding_size|"
     r"hidden_dim)", HIDDEN),
    (r"(head_dim|kv_channels|attention_head_dim|d_kv|head_size|v_head_dim|qk_nope_head_dim)", HEAD_DIM),
    (r"(qk_rope_head_dim|rotary_dim)", 8),
    (r"(q_lora_rank)", 48),
    (r"(kv_lora_rank)", 32),
    (r"(vocab_size)", VOCAB),
    (r"(max_position_embeddings|n_positions|max_seq_len|n_ctx|max_sequence_length)", POSITIONS),
    (r"(image_size)", IMAGE),
]
_STAGE_DEPTHS = r"(depths|num_layers_per_stage|stage_depths|layers_per_stage)"
_STAGE_WIDTHS = r"(hidden_sizes|embed_dims|dims|hidden_dims|channels|stage_channels|widths)"


class BuildError(RuntimeError):
    """The family's tiny model does not build or cannot be given inputs (the reason, one line)."""


class RegistryFamily:
    """One model type of the auto registries: its config class and the model class the sweep builds."""

    def __init__(self, name: str, task: str, class_name: str) -> None:
        self.name, self.task, self.class_name = name, task, class_name

    def model_class(self):
        import transformers

        cls = getattr(transformers, self.class_name, None)
        if cls is None:
            raise BuildError(f"transformers has no class {self.class_name}")
        return cls

    def config_class(self):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[self.name]


def registry_families() -> dict[str, RegistryFamily]:
    """One entry per model type in transformers' auto registries (``TASKS`` order picks the class)."""
    from transformers.models.auto import modeling_auto

    families: dict[str, RegistryFamily] = {}
    for task, mapping in TASKS:
        for name, class_name in getattr(modeling_auto, mapping).items():
            if isinstance(class_name, (list, tuple)):
                class_name = class_name[0]
            families.setdefault(name, RegistryFamily(name, task, class_name))
    return dict(sorted(families.items()))


def _first_line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}"[:300]


def _match(table, name: str):
    for pattern, value in table:
        if re.fullmatch(pattern, name):
            return value, pattern
    return None, None


def _shrunk_int(name: str, value: int, defaults: dict) -> int | None:
    """The tiny value of an integer field, or None to leave it."""
    count, pattern = _match(_COUNTS, name)
    if pattern is not None:
        if "key_value" in pattern:            # kv heads: as many as the heads (MHA), 1 (MQA) or 2
            heads = next((defaults[k] for k in ("num_attention_heads", "n_head", "num_heads")
                          if isinstance(defaults.get(k), int)), None)
            if value == 1:
                return 1
            return HEADS if heads is not None and value == heads else KV_HEADS
        return min(value, count) if count in (PER_TOKEN, 1) else count
    width, pattern = _match(_WIDTHS, name)
    if pattern is not None:
        return width if value > width else None
    # generic: another field equal to the default hidden or MLP width is a width of the same kind
    for key, tiny in (("hidden_size", HIDDEN), ("d_model", HIDDEN), ("n_embd", HIDDEN),
                      ("intermediate_size", FFN)):
        if isinstance(defaults.get(key), int) and value == defaults[key] and value >= 256:
            return tiny
    return None


def _first_layers(value: list) -> list:
    """The first 3 entries of a per-layer list, the last ones replaced by any kind they miss."""
    kept = list(value[:LAYERS])
    missing = [v for i, v in enumerate(value) if v not in kept and v not in value[:i]]
    for i, kind in enumerate(missing[:LAYERS - 1]):
        kept[LAYERS - 1 - i] = kind
    return kept


def _shrunk_list(name: str, value: list, layers: int | None) -> list | None:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if layers and len(value) == layers and len(value) > LAYERS:
            return _first_layers(value)             # one entry per layer (layer types)
        return None
    if re.fullmatch(_STAGE_DEPTHS, name):
        return [1] * len(value)
    if re.fullmatch(_STAGE_WIDTHS, name) and max(value) > HIDDEN:
        scale = max(value) / HIDDEN
        return [max(8, int(round(v / scale / 8)) * 8) for v in value]
    if layers and len(value) == layers and len(value) > LAYERS:
        return list(value[:LAYERS])
    return None


def _token_ids(changes: dict, defaults: dict) -> None:
    vocab = changes.get("vocab_size", defaults.get("vocab_size"))
    if not isinstance(vocab, int):
        return
    for key, value in defaults.items():
        if key.endswith("_token_id") and isinstance(value, int) and value >= vocab:
            changes[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 3)
        elif key.endswith("_token_id") and isinstance(value, list):
            changes[key] = [v if v < vocab else 2 for v in value if isinstance(v, int)]


def _priority(name: str) -> int:
    """Fields whose tiny value others of equal default follow: rotary widths first."""
    return 0 if re.fullmatch(r"(qk_rope_head_dim|rotary_dim)", name) else 1


def tiny_config_changes(defaults: dict) -> dict:
    """The changed fields of a config's ``to_dict()`` (sub-configs: dicts of their changes)."""
    changes: dict = {}
    layers = next((defaults[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(defaults.get(k), int)), None)
    tiny_of: dict[int, int] = {}           # a default width -> its tiny value: equal widths stay equal
    for name, value in sorted(defaults.items(), key=lambda item: _priority(item[0])):
        if isinstance(value, int) and not isinstance(value, bool) and value in tiny_of \
                and _match(_WIDTHS, name)[1] is not None and "vocab" not in name and "position" not in name:
            changes[name] = tiny_of[value]
            continue
        if isinstance(value, dict) and "model_type" in value:
            sub = tiny_config_changes(value)
            if sub:      # only the changes, so that the sub-config derives the rest anew
                changes[name] = {"model_type": value["model_type"], **sub}
        elif isinstance(value, int) and not isinstance(value, bool):
            new = _shrunk_int(name, value, defaults)
            if new is not None and new != value:
                changes[name] = new
                if _match(_WIDTHS, name)[1] is not None:
                    tiny_of.setdefault(value, new)
        elif isinstance(value, list):
            new = _shrunk_list(name, value, layers)
            if new is not None and new != value:
                changes[name] = new
        elif value is None and name == "vocab_size":      # a class whose checkpoints name its vocabulary
            changes[name] = VOCAB                           # (and its special tokens: below)
            changes.update({key: {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 3)
                            for key, token in defaults.items() if key.endswith("_token_id") and token is None})
    _token_ids(changes, defaults)
    _expanded_heads(changes, defaults)
    # kv heads unset: as many as the heads, what the classes that fill it in take it to mean (one
    # that does not would not build)
    heads = changes.get("num_attention_heads", defaults.get("num_attention_heads"))
    changes.update({name: heads for name, value in defaults.items()
                    if value is None and isinstance(heads, int) and _match(_COUNTS[1:2], name)[1] is not None})
    # experts routed per token unset where the class has routed experts: the tiny top-k
    if any(isinstance(defaults.get(name), int) and _match(_COUNTS[3:4], name)[1] is not None for name in defaults):
        changes.update({name: PER_TOKEN for name, value in defaults.items()
                        if value is None and _match(_COUNTS[4:5], name)[1] is not None})
    return changes


def _expanded_heads(changes: dict, defaults: dict) -> None:
    """Heads that tile the expanded inner width (``hidden_size × expand = num_heads × head_dim``, a
    state-space mixer's) tile the tiny one: the config class checks the product."""
    hidden, expand, heads, head_dim = (defaults.get(k) for k in ("hidden_size", "expand", "num_heads", "head_dim"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (hidden, expand, heads, head_dim)) \
            or hidden * expand != heads * head_dim:
        return
    inner, tiny_dim = changes.get("hidden_size", hidden) * expand, changes.get("head_dim", head_dim)
    if inner % tiny_dim == 0:
        changes["num_heads"] = inner // tiny_dim


def tiny_config(family: RegistryFamily):
    cls = family.config_class()
    try:
        defaults = cls().to_dict()
    except Exception as error:
        raise BuildError(f"the config class's defaults do not build: {_first_line(error)}") from error
    changes = tiny_config_changes(defaults)
    try:
        return cls(**changes)
    except Exception as error:
        raise BuildError(f"the tiny config does not build: {_first_line(error)}") from error


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny eval-mode model of model type ``name`` (``BuildError`` with the reason otherwise)."""
    family = registry_families()[name]
    config = tiny_config(family)
    model_cls = family.model_class()
    last = None
    # sdpa attention and grouped expert matmuls are the exportable implementations; a class that
    # lacks one is built with its eager one
    for attention, experts in (("sdpa", "grouped_mm"), ("sdpa", None), ("eager", "grouped_mm"), ("eager", None)):
        config._attn_implementation = attention
        config._experts_implementation = experts
        torch.manual_seed(seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = model_cls(config).eval()
            example = inputs(model, 2, 8, seed)
            with torch.no_grad():
                model(*example)
            return model
        except BuildError:
            raise
        except Exception as error:
            last = error if last is None or "implementation" in str(last) else last
    raise BuildError(f"the tiny model does not build or run: {_first_line(last)}") from last


def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", IMAGE)
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    if isinstance(size, dict):
        return int(size.get("height", IMAGE)), int(size.get("width", IMAGE))
    return int(size), int(size)


def is_sequence_fixed(model) -> bool:
    """True for image models: their inputs have no sequence axis to vary."""
    return "input_ids" not in inspect.signature(model.forward).parameters


def inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple:
    """The positional inputs ``model.forward`` needs (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    parameters = list(inspect.signature(model.forward).parameters)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", VOCAB)
    # tokens from 4 up: clear of the tiny config's special ids (0-3)
    ids = lambda: torch.randint(4, max(vocab, 5), (batch, seq), generator=g)        # noqa: E731
    made = {}
    if "input_ids" in parameters:
        made["input_ids"] = ids()
    elif "pixel_values" in parameters:
        channels = getattr(config, "num_channels", 3)
        made["pixel_values"] = torch.randn(batch, channels, *_image_size(config), generator=g)
    else:
        raise BuildError(f"{type(model).__name__}.forward takes neither input_ids nor pixel_values")
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        made["decoder_input_ids"] = ids()
    fill = {"attention_mask": lambda: torch.ones(batch, seq, dtype=torch.long)}
    last = max(parameters.index(k) for k in made)
    args = []
    for name in parameters[:last + 1]:
        if name in made:
            args.append(made[name])
        elif name in fill:
            args.append(fill[name]())
        else:
            raise BuildError(f"{type(model).__name__}.forward needs {name!r} before its inputs")
    return tuple(args)
