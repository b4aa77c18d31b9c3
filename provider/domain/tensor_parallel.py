"""How a Llama-family model splits across the N accelerators of one replica (tensor parallelism, Megatron-style).

Each rank holds a contiguous share of the attention heads (the rows of q, and of k and v for the KV heads those
heads read; the matching input columns of o_proj), of the MLP's intermediate features (the rows of gate and up,
the input columns of down), and of the vocabulary (the rows of the LM head). The embedding, the norms and the
output columns of o and down are whole on every rank; o's and down's partial products are summed across ranks
(an all-reduce), and the LM head's logits gathered.

Shares are as even as the model allows. Attention splits by KV group (each rank's query heads read its own KV
heads in equal groups): N that does not divide the KV heads gives some ranks a group more (the step runs at the
pace of the fullest rank), and N above the KV heads splits each group's query heads over several ranks, each
holding the group's KV head (as vLLM replicates KV heads). A rank must hold at least one attention head.

The provider's fit check (per-device memory) and the runtime's loader read the same shares from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Intermediate features are split in multiples of this (when the size allows): int4 weights are quantized in
# groups of 32 input features, and down_proj's input is what is split.
_FEATURE_UNIT = 32
_ALL = slice(None)


class Dims(Protocol):
    """What a config.json says of a model's shape (a catalog Architecture or the runtime's ModelConfig)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int: ...

    @property
    def num_experts(self) -> int: ...  # 0 for a dense model

    @property
    def expert_intermediate_size(self) -> int: ...  # one expert's MLP features (0 for a dense model)

    @property
    def expert_layer_count(self) -> int: ...  # the layers whose MLP is the experts


def _share(total: int, size: int, rank: int, unit: int = 1) -> range:
    """Rank's contiguous share of `total` items split `size` ways in whole units; the first ranks get one unit
    more when the units do not divide evenly."""
    if total % unit:
        unit = 1
    base, extra = divmod(total // unit, size)
    start = rank * base + min(rank, extra)
    return range(start * unit, (start + base + (rank < extra)) * unit)


@dataclass(frozen=True)
class Shard:
    """One rank's share of the model."""

    rank: int
    size: int
    head_dim: int
    heads: range  # query heads
    kv_heads: range  # the KV heads those query heads read
    intermediate: range  # MLP features
    vocab: range  # LM head rows
    expert_intermediate: range = range(0)  # each expert's MLP features (Mixture of Experts: every expert splits)

    def rows(self, module: str) -> slice:
        """The output rows of `module`'s weight this rank holds (all of them for a row-parallel module)."""
        d = self.head_dim
        share = {"q_proj": (self.heads, d), "k_proj": (self.kv_heads, d), "v_proj": (self.kv_heads, d),
                 "gate_proj": (self.intermediate, 1), "up_proj": (self.intermediate, 1),
                 "expert_gate_proj": (self.expert_intermediate, 1), "expert_up_proj": (self.expert_intermediate, 1),
                 "lm_head": (self.vocab, 1)}.get(module)
        return _ALL if share is None else slice(share[0].start * share[1], share[0].stop * share[1])

    def columns(self, module: str) -> slice:
        """The input columns of `module`'s weight this rank holds (all of them but for o_proj and down_proj)."""
        if module == "o_proj":
            return slice(self.heads.start * self.head_dim, self.heads.stop * self.head_dim)
        if module == "down_proj":
            return slice(self.intermediate.start, self.intermediate.stop)
        if module == "expert_down_proj":
            return slice(self.expert_intermediate.start, self.expert_intermediate.stop)
        return _ALL


def shard_of(dims: Dims, size: int, rank: int) -> Shard:
    """Rank `rank`'s share of a model split `size` ways (check `refusal` first).

    Attention is split by KV group, so that each rank's query heads read its KV heads in equal groups (as grouped
    attention kernels need): with no more ranks than KV heads, each rank gets whole groups; with more, each group
    gets several ranks, which split its query heads and each hold its KV head."""
    kv, group = dims.num_key_value_heads, dims.num_attention_heads // dims.num_key_value_heads
    if size <= kv:
        kv_heads = _share(kv, size, rank)
        heads = range(kv_heads.start * group, kv_heads.stop * group)
    else:
        owner = next(g for g in range(kv) if rank in _share(size, kv, g))  # the KV head this rank's heads read
        ranks = _share(size, kv, owner)
        mine = _share(group, len(ranks), rank - ranks.start)
        kv_heads = range(owner, owner + 1)
        heads = range(owner * group + mine.start, owner * group + mine.stop)
    return Shard(rank, size, dims.head_dim, heads, kv_heads,
                 _share(dims.intermediate_size, size, rank, _FEATURE_UNIT), _share(dims.vocab_size, size, rank),
                 _share(dims.expert_intermediate_size, size, rank, _FEATURE_UNIT))


def refusal(dims: Dims, size: int) -> str | None:
    """Why a model cannot be split `size` ways, or None when it can."""
    if size < 1:
        return f"{size} is not a number of accelerators"
    if any(not shard_of(dims, size, rank).heads for rank in range(size)):
        most = max(n for n in range(1, dims.num_attention_heads + 1) if all(
            shard_of(dims, n, rank).heads for rank in range(n)))
        return (f"{size} ranks cannot share the model's {dims.num_attention_heads} attention heads "
                f"({dims.num_key_value_heads} KV heads) so that each holds one; use at most {most}")
    return None


def even(dims: Dims, size: int) -> bool:
    """Whether every rank gets the same share of heads and features (no rank waits on a larger one)."""
    shares = [shard_of(dims, size, rank) for rank in range(size)]
    return len({(len(s.heads), len(s.kv_heads), len(s.intermediate)) for s in shares}) == 1


def weights_per_device(dims: Dims, size: int, projection_bytes: float, other_bytes: float) -> float:
    """The bytes of weights the fullest rank holds: its share of the projections and LM head at
    `projection_bytes` per weight, the embedding and norms whole at `other_bytes` (quantized precisions keep
    those in bf16)."""
    h, layers, d = dims.hidden_size, dims.num_hidden_layers, dims.head_dim
    most = 0.0
    for rank in range(size):
        s = shard_of(dims, size, rank)
        attention = (len(s.heads) + 2 * len(s.kv_heads)) * d * h + h * len(s.heads) * d
        dense = layers - dims.expert_layer_count
        mlp = 3 * h * (dense * len(s.intermediate) + dims.expert_layer_count * dims.num_experts * len(s.expert_intermediate))
        router = dims.expert_layer_count * dims.num_experts * h
        # a tied LM head is the embedding's rows, unless quantized apart from it
        head = 0 if dims.tie_word_embeddings and projection_bytes == other_bytes else len(s.vocab) * h
        projections = layers * attention + mlp + head
        # embedding, routers, two norms a layer (Gemma's four count as noise), the final norm
        whole = dims.vocab_size * h + router + layers * 2 * h + h
        most = max(most, projections * projection_bytes + whole * other_bytes)
    return most
