"""Pre-quantized test checkpoints in their published layouts, and their float32 references.

compressed-tensors checkpoints are made by the `compressed-tensors` package itself from a
tiny random transformers Llama (its schemes applied, scales and zero points from each
weight's min/max, its compressor writing the packed tensors and config.json's
quantization_config). The reference of each is transformers running the weights the
package's own unpacking + dequantization give back, in float32.
"""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np

STREAM = np.random.default_rng(0).integers(3, 101, 64).tolist()  # fixed 64-token stream
PROMPT = STREAM[:6]
STEPS = 32
GROUP = 32  # small model: in dims 64 and 128
FP8_BLOCK = 16  # FP8 blocks (128 x 128 in published checkpoints): out dims 16 .. 128


def base_llama():
    """A tiny random float32 Llama (GQA, untied head) with peaked next-token distributions."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def reference(model) -> tuple[np.ndarray, list[int]]:
    """(float32 logits [t, v] over STREAM, STEPS greedy tokens after PROMPT)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([STREAM])).logits[0].numpy()
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, pad_token_id=0)
    return logits, out[0, len(PROMPT):].tolist()


def compressed_tensors_dir(base, kind: str, directory: pathlib.Path) -> pathlib.Path:
    """A compressed-tensors checkpoint of `base`: kind "w8a16" (int8 channel-wise,
    pack-quantized), "w8a8" (int8 channel-wise weights + dynamic int8 activations,
    int-quantized), "w4a16" (int4 groups of GROUP, pack-quantized), "w4a16_asym" (with
    zero points)."""
    import safetensors.torch
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = copy.deepcopy(base)
    preset = {"w8a16": "W8A16", "w8a8": "W8A8", "w4a16": "W4A16",
              "w4a16_asym": "W4A16_ASYM", "fp8": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK"}[kind]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if kind == "fp8_block":  # blocks of FP8_BLOCK's layout, sized for the tiny model
        scheme.weights.block_structure = [FP8_BLOCK, FP8_BLOCK]
    if kind.startswith("w4"):
        scheme.weights.group_size = GROUP
    if kind == "w8a16":  # channel-wise (the preset groups by 128)
        scheme.weights = QuantizationArgs(num_bits=8, type="int", symmetric=True,
                                          strategy="channel")
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "weight_scale"):
                continue
            w, args = module.weight, module.quantization_scheme.weights
            if args.strategy == "block":
                view = w.reshape(w.shape[0] // FP8_BLOCK, FP8_BLOCK, -1, FP8_BLOCK)
                view = view.transpose(1, 2).reshape(*view.shape[::2], -1)
            else:
                view = (w.reshape(w.shape[0], -1, args.group_size) if args.strategy == "group"
                        else w[:, None, :])
            scale, zero = calculate_qparams(view.amin(-1), view.amax(-1), args)
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero)
    fmt = ("int-quantized" if kind == "w8a8" else "float-quantized" if kind.startswith("fp8")
           else "pack-quantized")
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    directory.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                directory / "model.safetensors")
    model.config.save_pretrained(directory)
    compressor.update_config(str(directory))
    return directory


def compressed_tensors_dequantized(base, directory: pathlib.Path):
    """`base` with each quantized Linear's weight as the package dequantizes it (float32)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    group = next(iter(config["config_groups"].values()))
    args = QuantizationArgs(**group["weights"])
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in model.named_modules():
            scale = tensors.get(f"{name}.weight_scale")
            if scale is None:
                continue
            zero = tensors.get(f"{name}.weight_zero_point")
            if f"{name}.weight_packed" in tensors:
                shape = tuple(tensors[f"{name}.weight_shape"].tolist())
                q = unpack_from_int32(tensors[f"{name}.weight_packed"], args.num_bits, shape)
                if zero is not None:
                    zero = unpack_from_int32(zero, args.num_bits, (shape[0], scale.shape[1]),
                                             packed_dim=0)
            else:
                q = tensors[f"{name}.weight"]
            if args.strategy == "block":  # the package dequantizes blocks by its scale shape
                scale = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
                module.weight.copy_(q.float() * scale.float())
                continue
            module.weight.copy_(dequantize(q, scale.float(), zero, args).float())
    return model


def stored_quantized_bytes(directory: pathlib.Path) -> int:
    """Bytes of the quantized layers' values, scales and zero points as stored (the shape
    tensors and activation settings are metadata, not held)."""
    from safetensors import safe_open

    total = 0
    with safe_open(directory / "model.safetensors", "np") as f:
        names = set(f.keys())
        quantized = {n.rsplit(".", 1)[0] for n in names if n.endswith(".weight_scale")}
        for name in names:
            prefix, _, part = name.rpartition(".")
            if prefix in quantized and part in ("weight", "weight_packed", "weight_scale",
                                                 "weight_zero_point"):
                total += f.get_tensor(name).nbytes
    return total


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _int4_groups(w: np.ndarray, symmetric: bool, g_idx: np.ndarray):
    """(q uint8 [out, in], z uint8 [out, G], s float16 [out, G]) of w [out, in], input
    column i in group g_idx[i] (GROUP columns each), min/max scales rounded to float16
    before quantizing."""
    out, in_ = w.shape
    members = np.argsort(g_idx, kind="stable")  # group 0's columns, then group 1's, ...
    v = w[:, members].reshape(out, in_ // GROUP, GROUP)
    if symmetric:
        s = (np.abs(v).max(-1) / 7).astype(np.float16)
        z = np.full(s.shape, 8, np.int32)
    else:
        lo, hi = np.minimum(v.min(-1), 0), np.maximum(v.max(-1), 0)
        s = ((hi - lo) / 15).astype(np.float16)
        z = np.clip(np.round(-lo / s.astype(np.float32)), 0, 15).astype(np.int32)
    q_grouped = np.clip(np.round(v / s.astype(np.float32)[..., None]) + z[..., None], 0, 15)
    q = np.empty((out, in_), np.uint8)
    q[:, members] = q_grouped.reshape(out, in_)
    return q, z.astype(np.uint8), s


def desc_act_g_idx(in_: int, rng) -> np.ndarray:
    """GPTQ's g_idx with desc_act: the columns quantized in an activation order (here a
    random one), column i in group (its place in that order) // GROUP."""
    order = rng.permutation(in_)
    return (np.argsort(order) // GROUP).astype(np.int32)


def _words(fields: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """int32 [..., n / 8] from 4-bit fields [..., n]: field i of each word holds element
    order[i] of its 8."""
    f = fields.astype(np.uint32).reshape(*fields.shape[:-1], -1, 8)
    word = np.zeros(f.shape[:-1], np.uint32)
    for i, element in enumerate(order):
        word |= f[..., element] << np.uint32(4 * i)
    return word.view(np.int32)


def packed_int32_dir(base, kind: str, directory: pathlib.Path):
    """An AWQ (GEMM, zero points) or GPTQ (checkpoint_format "gptq": zeros stored minus one)
    checkpoint of `base`, packed here from each format's description; kind "awq",
    "gptq_sym", "gptq_asym", "gptq_act" (desc_act with the identity g_idx) or
    "gptq_act_perm" / "gptq_act_perm_sym" (desc_act quantized in a random activation order
    per layer: the columns of a group apart, g_idx as GPTQ writes it). Returns (directory,
    the model with the dequantized weights)."""
    import safetensors.numpy
    import torch

    model = copy.deepcopy(base)
    tensors = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
    symmetric = kind.endswith("sym") and not kind.endswith("asym")
    rng = np.random.default_rng(0)
    for name, module in model.named_modules():
        if name.rpartition(".")[2] not in LINEARS:
            continue
        w = tensors.pop(f"{name}.weight")
        g_idx = (desc_act_g_idx(w.shape[1], rng) if kind.startswith("gptq_act_perm")
                 else np.arange(w.shape[1], dtype=np.int32) // GROUP)
        q, z, s = _int4_groups(w, symmetric, g_idx)
        with torch.no_grad():  # weight[o, i] = (q[o, i] - z[o, g_idx[i]]) * s[o, g_idx[i]]
            deq = (q.astype(np.float32) - z[:, g_idx]) * s.astype(np.float32)[:, g_idx]
            module.weight.copy_(torch.from_numpy(deq))
        if kind == "awq":
            tensors[f"{name}.qweight"] = _words(q.T, AWQ_ORDER)
            tensors[f"{name}.qzeros"] = _words(z.T, AWQ_ORDER)
        else:
            tensors[f"{name}.qweight"] = _words(q).T.copy()  # rows of a column in a word
            tensors[f"{name}.qzeros"] = _words((z.T.astype(np.int32) - 1) & 0xF)
            tensors[f"{name}.g_idx"] = g_idx
        tensors[f"{name}.scales"] = np.ascontiguousarray(s.T)
    directory.mkdir(parents=True)
    safetensors.numpy.save_file(tensors, directory / "model.safetensors")
    base.config.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
         "version": "gemm"} if kind == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": symmetric,
         "desc_act": kind.startswith("gptq_act"), "checkpoint_format": "gptq"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory, model


def packed_int32_bytes(directory: pathlib.Path, zeros: bool, g_idx: bool = False) -> int:
    """Bytes of every qweight and scales (and qzeros when they carry zero points, g_idx
    when it reorders the rows) as stored."""
    from safetensors import safe_open

    parts = (".qweight", ".scales") + ((".qzeros",) if zeros else ()) + (
        (".g_idx",) if g_idx else ())
    with safe_open(directory / "model.safetensors", "np") as f:
        return sum(f.get_tensor(n).nbytes for n in f.keys() if n.endswith(parts))
