"""Issue #11 kinds 2 and 5: the sentence-transformers module pipeline that modules.json
declares, and legacy / prefixed BERT tensor names. sentence-transformers is not installed
here: the reference applies its documented module semantics (Pooling modes, Dense, Normalize)
by hand in torch to transformers' BertModel output."""

import json
import pathlib

import numpy as np
import pytest
from cli_runner import one_error_line, run_cli
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["a cat sat on the mat", "jax compiles programs with xla for accelerators", "hi"]
MODE_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
             "mean": "pooling_mode_mean_tokens",
             "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
             "weightedmean": "pooling_mode_weightedmean_tokens",
             "lasttoken": "pooling_mode_lasttoken"}


def linked_copy(minilm_src: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """MiniLM with symlinked weights and tokenizer, own modules.json and 1_Pooling."""
    dest.mkdir()
    for item in minilm_src.iterdir():
        if item.is_file() and item.name != "modules.json":
            (dest / item.name).symlink_to(item)
    (dest / "1_Pooling").mkdir()
    modules = json.loads((minilm_src / "modules.json").read_text())
    (dest / "modules.json").write_text(json.dumps(modules))
    return dest


def set_pipeline(src, mode, normalize=True, dense=None):
    config = {"word_embedding_dimension": 384, **{k: m == mode for m, k in MODE_KEYS.items()}}
    (src / "1_Pooling" / "config.json").write_text(json.dumps(config))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if dense is not None:
        (src / "2_Dense").mkdir()
        (src / "2_Dense" / "config.json").write_text(json.dumps(
            {"in_features": 384, "out_features": dense["w"].shape[0], "bias": True,
             "activation_function": "torch.nn.modules.activation.Tanh"}))
        save_file({"linear.weight": dense["w"], "linear.bias": dense["b"]},
                  src / "2_Dense" / "model.safetensors")
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if normalize:
        modules.append({"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"})
    (src / "modules.json").write_text(json.dumps(modules))


def reference(src, mode, normalize=True, dense=None) -> np.ndarray:
    """sentence-transformers' Pooling/Dense/Normalize semantics, computed in torch."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.BertModel.from_pretrained(src).eval()
    out = []
    for text in TEXTS:
        batch = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            x = model(**batch).last_hidden_state[0]  # [t, d]
        t = x.shape[0]
        pooled = {"cls": x[0], "max": x.max(0).values, "mean": x.mean(0),
                  "mean_sqrt_len_tokens": x.sum(0) / np.sqrt(t),
                  "weightedmean": (x * torch.arange(1, t + 1)[:, None]).sum(0) / (t * (t + 1) / 2),
                  "lasttoken": x[-1]}[mode]
        if dense is not None:
            pooled = torch.tanh(torch.from_numpy(dense["w"]) @ pooled + torch.from_numpy(dense["b"]))
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=0)
        out.append(pooled.numpy())
    return np.stack(out)


def embed(capsys, monkeypatch, src, tmp_path):
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "ckpt", "-q")
    assert code == 0, err
    args = [a for t in TEXTS for a in ("--text", t)]
    code, out, err = run_cli(capsys, monkeypatch, "embed", tmp_path / "ckpt", *args, "--json")
    assert code == 0, err
    return np.asarray(json.loads(out)["embeddings"], np.float32)


@pytest.mark.parametrize("mode,normalize", [("cls", True), ("max", True), ("lasttoken", False),
                                            ("mean_sqrt_len_tokens", False),
                                            ("weightedmean", True), ("mean", False)])
def test_pooling_modes_match_sentence_transformers(mode, normalize, minilm_src, tmp_path, capsys,
                                                   monkeypatch):
    src = linked_copy(minilm_src, tmp_path / "src")
    set_pipeline(src, mode, normalize)
    ours, ref = embed(capsys, monkeypatch, src, tmp_path), reference(src, mode, normalize)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999, cos
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1),
                               rtol=1e-4)


def test_dense_module_after_pooling(minilm_src, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    dense = {"w": (rng.standard_normal((128, 384)) * 0.1).astype(np.float32),
             "b": (rng.standard_normal(128) * 0.1).astype(np.float32)}
    src = linked_copy(minilm_src, tmp_path / "src")
    set_pipeline(src, "mean", normalize=False, dense=dense)
    ours, ref = embed(capsys, monkeypatch, src, tmp_path), reference(src, "mean", False, dense)
    assert ours.shape == (3, 128)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    code, out, _ = run_cli(capsys, monkeypatch, "inspect", tmp_path / "ckpt", "--json")
    assert json.loads(out)["arrays"]["pooling_dense.w_df"]["shape"] == [384, 128]


def test_unknown_module_is_refused_by_name(minilm_src, tmp_path, capsys, monkeypatch):
    src = linked_copy(minilm_src, tmp_path / "src")
    set_pipeline(src, "mean")
    modules = json.loads((src / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_LayerNorm",
                       "type": "sentence_transformers.models.LayerNorm"})
    (src / "modules.json").write_text(json.dumps(modules))
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "out", "-q")
    assert code == 1 and "2_LayerNorm" in one_error_line(err) and "LayerNorm" in err


def test_legacy_gamma_beta_names(minilm_src, tmp_path, capsys, monkeypatch):
    src = linked_copy(minilm_src, tmp_path / "src")
    (src / "model.safetensors").unlink()
    tensors = load_file(minilm_src / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
               .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    set_pipeline(src, "mean")
    ours = embed(capsys, monkeypatch, src, tmp_path)
    np.testing.assert_allclose(ours, reference(minilm_src, "mean"), atol=2e-5)


def test_bert_for_pretraining_heads_are_ignored(tmp_path, capsys, monkeypatch):
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37,
                                     max_position_embeddings=64)
    model = transformers.BertForPreTraining(config).eval()
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    code, out, err = run_cli(capsys, monkeypatch, "convert", tmp_path / "src", tmp_path / "ckpt",
                             "-q", "--json")
    assert code == 0, err
    ignored = json.loads(out)["ignored_tensors"]
    assert any(n.startswith("bert.pooler.") for n in ignored)
    assert any(n.startswith("cls.") for n in ignored)
    _, text, _ = run_cli(capsys, monkeypatch, "inspect", tmp_path / "ckpt")
    assert "bert.pooler.dense.weight" in text
    ids = [[2, 5, 7, 9], [3, 4]]
    ours = Embedder(load_model(tmp_path / "ckpt")).embed_ids(ids)
    for row, vector in zip(ids, ours):
        with torch.no_grad():
            x = model.bert(torch.tensor([row])).last_hidden_state[0].mean(0)
        np.testing.assert_allclose(vector, torch.nn.functional.normalize(x, dim=0).numpy(),
                                   atol=2e-5)
