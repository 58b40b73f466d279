"""The mixture-of-experts decoder the MoE families share (Mixtral, Qwen2-MoE, Qwen3-MoE):
Llama's attention (optionally with q/k/v biases and Qwen3's q/k norms) and a
mixture-of-experts MLP (`moe.MoE`), with dense MLP layers where config.json lists them.

Shape legend as in `layers`, plus e experts.

Parameters: `blocks.*` stacks the MoE layers (`blocks.moe.wg_edf`, `blocks.moe.router_de`,
...) and `dense_blocks.*` the layers with a dense MLP (Qwen's `mlp_only_layers` and
`decoder_sparse_step`), each over its own leading layers axis; the forward runs the layers in
order, one scan per run of layers of one kind. Expert weights are stacked [e, ...] from one
source tensor per expert (as the checkpoints are published).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.models import activation_memory, blocks, layers, llama, moe, rotary
from jaxaccel.models.family import ActivationShape
from jaxaccel.models.kv_cache import KVCache
from jaxaccel.models.weights import WeightRule, transpose_to
from jaxaccel.parallel import sharding as ax

MOE, DENSE = "blocks", "dense_blocks"  # the two layer stacks, by parameter prefix


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # per expert
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP of `intermediate_size`

    @property
    def moe_layout(self) -> moe.MoELayout:
        return moe.MoELayout(num_experts=self.num_experts, top_k=self.num_experts_per_tok,
                             intermediate_size=self.moe_intermediate_size,
                             norm_topk_prob=self.norm_topk_prob, activation=self.hidden_act,
                             shared_intermediate_size=self.shared_expert_intermediate_size)

    @property
    def layout(self) -> blocks.DecoderLayout:
        """The MoE layers' layout (the dense layers': `dense_layout`)."""
        return dataclasses.replace(self.dense_layout, moe=self.moe_layout)

    @property
    def dense_layout(self) -> blocks.DecoderLayout:
        return llama.Config.layout.fget(self)

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)


def dense_layers(hf: dict) -> tuple[int, ...]:
    """Qwen's rule: layer i has experts unless listed in `mlp_only_layers` or (i + 1) is not a
    multiple of `decoder_sparse_step` (a config without these keys: every layer has experts)."""
    only = set(hf.get("mlp_only_layers") or ())
    step = hf.get("decoder_sparse_step") or 1
    return tuple(i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step)


def runs(cfg: Config) -> list[tuple[str, int, int, int]]:
    """(stack, first index in the stack, count, first layer) of each run of consecutive
    layers of one kind, in layer order."""
    out, seen = [], {MOE: 0, DENSE: 0}
    for i in range(cfg.num_layers):
        stack = DENSE if i in cfg.dense_layers else MOE
        if out and out[-1][0] == stack:
            out[-1] = (stack, out[-1][1], out[-1][2] + 1, out[-1][3])
        else:
            out.append((stack, seen[stack], 1, i))
        seen[stack] += 1
    return out


class Model(nnx.Module):
    """Embedding, the layer stacks, final RMSNorm and head (as `llama.Model`)."""

    def __init__(self, cfg: Config, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 head_copy: bool = False):
        d = cfg.hidden_size
        self.config = cfg
        self.token_vd = layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)
        sparse, dense = len(cfg.sparse_layers), len(cfg.dense_layers)
        self.blocks = blocks.DecoderBlock(cfg, cfg.layout, dtype=dtype, rngs=rngs,
                                          num_layers=sparse) if sparse else None
        self.dense_blocks = blocks.DecoderBlock(cfg, cfg.dense_layout, dtype=dtype, rngs=rngs,
                                                num_layers=dense) if dense else None
        self.norm_scale_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.ones_init)
        head = lambda: layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)  # noqa: E731
        self.lm_head_vd = head() if head_copy or not cfg.tie_word_embeddings else None

    def __call__(self, ids_bt, positions_bt, mask_btt, cache: KVCache | None = None,
                 cache_mask_bts=None, cache_positions_bs=None):
        """Final hidden states [b, t, d] and this call's keys/values [l, b, k, t, h];
        `cache_positions_bs` as in `llama.Model` (sliding-window layers, e.g. Mixtral's)."""
        x_btd = layers.lookup(self.token_vd[...], ids_bt)
        tables = rotary.tables(positions_bt, self.config)
        local = llama.local_layers(self.config, positions_bt, mask_btt, cache_mask_bts,
                                   cache_positions_bs)
        parts = runs(self.config)
        if len(parts) == 1:  # one kind of layer: one scan, as every dense decoder runs
            x_btd, new_kv = blocks.run_layers(getattr(self, parts[0][0]), x_btd, tables,
                                              mask_btt, cache, cache_mask_bts, local)
        else:
            if layers.layer_runner() is not None:  # a pipeline splits one stack of them all
                raise ValueError(f"layers {list(self.config.dense_layers)} of this model have a "
                                 "dense MLP and the others experts: pipeline stages (a `stage` "
                                 "mesh axis) need layers of one kind; use data, model or "
                                 "expert parallelism")
            kvs = []
            for stack, start, count, first in parts:
                part = _slice(getattr(self, stack), start, count)
                cached = None if cache is None else _slice_tree(cache, first, count)
                part_local = None if local is None else local._replace(
                    windowed_lb=local.windowed_lb[first:first + count])
                x_btd, kv = blocks.run_layers(part, x_btd, tables, mask_btt, cached,
                                              cache_mask_bts, part_local)
                kvs.append(kv)
            new_kv = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs)
        return blocks.norm(self.config.layout, x_btd, self.norm_scale_d, None), new_kv

    def logits(self, x_btd):
        """Float32 logits [b, t, v]; the head is [v, d], as Hugging Face stores it."""
        head = self.token_vd if self.lm_head_vd is None else self.lm_head_vd
        return layers.head_logits(x_btd, head[...])


def _slice_tree(tree, start: int, count: int):
    return jax.tree.map(lambda a: a[start:start + count], tree)


def _slice(stack: nnx.Module, start: int, count: int) -> nnx.Module:
    """Layers start .. start + count - 1 of a stacked module."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, _slice_tree(state, start, count))


# ---------------------------------------------------------------- weight names

@dataclasses.dataclass(frozen=True)
class SourceNames:
    """How one family's checkpoints name a MoE layer's tensors (after `layers.{i}.`);
    `{e}` is the expert."""

    router: str  # [e, d]
    gate: str  # per expert [f, d]
    up: str  # per expert [f, d]
    down: str  # per expert [d, f]
    shared: str | None = None  # the shared expert's module prefix (gate_proj/up_proj/down_proj)
    shared_gate: str | None = None  # [1, d]


QWEN_NAMES = SourceNames(router="mlp.gate.weight", gate="mlp.experts.{e}.gate_proj.weight",
                         up="mlp.experts.{e}.up_proj.weight",
                         down="mlp.experts.{e}.down_proj.weight")


def _stack_transposed(*per_expert: np.ndarray) -> np.ndarray:
    """One torch Linear [out, in] per expert -> [e, in, out]."""
    return np.stack([w.T for w in per_expert])


def _expert_rule(target: str, pattern: str, cfg: Config, fused: WeightRule) -> WeightRule:
    names = [f"layers.{{i}}.{pattern.replace('{e}', str(e))}" for e in range(cfg.num_experts)]
    return WeightRule(target, names[0], _stack_transposed, extra=tuple(names[1:]),
                      layers=cfg.sparse_layers, fallback=fused)


def _fused_rules(cfg: Config, prefix: str) -> dict[str, WeightRule]:
    """transformers 5's own layout (`save_pretrained(save_original_format=False)`): the
    router as `mlp.gate`, every expert in one tensor, gate and up fused [e, 2f, d] (gate
    first), down [e, d, f]."""
    f, sparse, fused = cfg.moe_intermediate_size, cfg.sparse_layers, "layers.{i}.mlp.experts."
    return {
        "router_de": WeightRule(prefix + "router_de", "layers.{i}.mlp.gate.weight",
                                transpose_to, layers=sparse),
        "wg_edf": WeightRule(prefix + "wg_edf", fused + "gate_up_proj",
                             lambda w: w[:, :f].transpose(0, 2, 1), layers=sparse),
        "wu_edf": WeightRule(prefix + "wu_edf", fused + "gate_up_proj",
                             lambda w: w[:, f:].transpose(0, 2, 1), layers=sparse),
        "wm_efd": WeightRule(prefix + "wm_efd", fused + "down_proj",
                             lambda w: w.transpose(0, 2, 1), layers=sparse)}


def moe_rules(cfg: Config, names: SourceNames) -> list[WeightRule]:
    """Rules for the MoE layers' router, experts and shared expert."""
    prefix, sparse = f"{MOE}.moe.", cfg.sparse_layers
    fused = _fused_rules(cfg, prefix)
    router = f"layers.{{i}}.{names.router}"
    rules = [WeightRule(prefix + "router_de", router, transpose_to, layers=sparse,
                        fallback=None if fused["router_de"].source == router
                        else fused["router_de"]),
             _expert_rule(prefix + "wg_edf", names.gate, cfg, fused["wg_edf"]),
             _expert_rule(prefix + "wu_edf", names.up, cfg, fused["wu_edf"]),
             _expert_rule(prefix + "wm_efd", names.down, cfg, fused["wm_efd"])]
    if cfg.shared_expert_intermediate_size:
        shared = f"layers.{{i}}.{names.shared}."
        rules += [WeightRule(prefix + f"shared_{target}", shared + f"{hf}.weight", transpose_to,
                             layers=sparse)
                  for target, hf in (("wg_df", "gate_proj"), ("wu_df", "up_proj"),
                                     ("wm_fd", "down_proj"))]
        rules.append(WeightRule(prefix + "shared_gate_d1", f"layers.{{i}}.{names.shared_gate}",
                                transpose_to, layers=sparse))
    return rules


_DENSE_MLP = ("blocks.wg_df", "blocks.wu_df", "blocks.wm_fd", "blocks.bg_f", "blocks.bu_f",
              "blocks.bm_d")


def weight_rules(cfg: Config, names: SourceNames) -> list[WeightRule]:
    """Llama's attention and norm rules for each stack, the dense layers' MLP, the experts."""
    rules = []
    for rule in llama.weight_rules(cfg):
        if not rule.per_layer:
            rules.append(rule)
            continue
        is_mlp = rule.target in _DENSE_MLP
        if cfg.sparse_layers and not is_mlp:
            rules.append(dataclasses.replace(rule, layers=cfg.sparse_layers))
        if cfg.dense_layers:
            rules.append(dataclasses.replace(rule, target=DENSE + rule.target[len(MOE):],
                                             layers=cfg.dense_layers))
    return rules + (moe_rules(cfg, names) if cfg.sparse_layers else [])


def quantized_weights(shared_expert: bool, dense_layers: bool) -> dict[str, tuple[int, ...]]:
    """The MoE stack's attention weights and every expert's matmul weights; with
    `dense_layers`, the dense stack's attention and MLP weights too."""
    dense = blocks.quantized_weights(gated_mlp=True)
    attention = {k: v for k, v in dense.items() if k not in _DENSE_MLP}
    stack = {DENSE + k[len(MOE):]: v for k, v in dense.items()} if dense_layers else {}
    return {**attention, **stack, **moe.quantized_weights(f"{MOE}.moe", shared_expert)}


def activation_bytes(config: Config, shape: ActivationShape) -> int:
    """A dense decoder's prefill buffers plus the expert dispatch: per (token, slot) pair the
    sorted rows [b t k, d], the gated hidden [b t k, f] (twice) and the outputs [b t k, d]."""
    b = math.ceil(shape.batch / shape.split(ax.BATCH))
    pairs = b * shape.seq * config.num_experts_per_tok
    f = math.ceil(config.moe_intermediate_size / shape.split(ax.MLP))
    dispatch = pairs * (2 * config.hidden_size + 3 * f) * shape.itemsize
    return activation_memory.decoder_bytes(config, shape) + dispatch
