"""sentence-transformers settings (issue 29): prompts and default_prompt_name, pooling mode,
Normalize, max_seq_length and do_lower_case are read at convert time and applied; another
prompt is chosen with `Model.embed(prompt_name=)` / `embed --prompt-name`; a setting that
jaxaccel does not apply is refused in one line. The reference is sentence-transformers'
pipeline computed here with transformers and torch on the same directory."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cli_runner import one_error_line, run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["A man is eating food.", "The new movie is awesome, said NOBODY in Paris",
         "Two dogs play in the snow near a red barn while the children watch them."]


def st_directory(minilm_src, tmp_path, *, st_config=None, bert_config=None, pooling=None,
                 normalize=True):
    """A copy of MiniLM's sentence-transformers export with other settings."""
    src = tmp_path / "src"
    src.mkdir()
    for path in minilm_src.iterdir():
        if path.is_file():
            (src / path.name).symlink_to(path)
    (src / "1_Pooling").mkdir()
    pool = json.loads((minilm_src / "1_Pooling" / "config.json").read_text())
    (src / "1_Pooling" / "config.json").write_text(json.dumps({**pool, **(pooling or {})}))
    modules = json.loads((minilm_src / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    for name, values in (("modules.json", modules), ("config_sentence_transformers.json",
                                                      st_config),
                         ("sentence_bert_config.json", bert_config)):
        if values is not None:
            (src / name).unlink(missing_ok=True)
            (src / name).write_text(json.dumps(values))
    return src


def reference(src, texts, *, prompt="", lower=False, pooling="mean", normalize=True,
              max_length=256):
    """sentence-transformers' encode, step by step: prompt + text, optional lower-casing,
    truncation at max_seq_length, the pooling mode, then Normalize."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModel.from_pretrained(src).eval()
    texts = [prompt + t for t in texts]
    texts = [t.lower() for t in texts] if lower else texts
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    if pooling == "mean":
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:  # max over real tokens
        pooled = hidden.masked_fill(mask == 0, -1e9).max(1).values
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


def convert(capsys, monkeypatch, src, dest):
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, dest, "-q")
    assert code == 0, err
    return dest


def embed_cli(capsys, monkeypatch, ckpt, *extra):
    args = [a for t in TEXTS for a in ("-t", t)]
    code, out, err = run_cli(capsys, monkeypatch, "embed", ckpt, *args, "--json", "-q", *extra)
    assert code == 0, err
    return np.array(json.loads(out)["embeddings"])


PROMPTS = {"query": "query: ", "passage": "passage: ", "clustering": "Identify the topic: "}


def test_default_prompt_and_prompt_name_choose_the_prefix(minilm_src, tmp_path, capsys,
                                                          monkeypatch):
    import jaxaccel

    src = st_directory(minilm_src, tmp_path, st_config={
        "prompts": PROMPTS, "default_prompt_name": "passage", "similarity_fn_name": "cosine"})
    ckpt = convert(capsys, monkeypatch, src, tmp_path / "ckpt")
    np.testing.assert_allclose(embed_cli(capsys, monkeypatch, ckpt),
                               reference(src, TEXTS, prompt="passage: "), atol=3e-5)
    np.testing.assert_allclose(embed_cli(capsys, monkeypatch, ckpt, "--prompt-name",
                                         "clustering"),
                               reference(src, TEXTS, prompt=PROMPTS["clustering"]), atol=3e-5)
    model = jaxaccel.load(ckpt)
    np.testing.assert_allclose(model.embed(TEXTS, prompt_name="query"),
                               reference(src, TEXTS, prompt="query: "), atol=3e-5)
    with pytest.raises(jaxaccel.UsageError, match="'document'.*clustering"):
        model.embed(TEXTS, prompt_name="document")
    code, _, err = run_cli(capsys, monkeypatch, "embed", ckpt, "-t", "hi", "--prompt-name", "x")
    assert code == 2 and "'x'" in one_error_line(err)


def test_prompts_without_a_default_apply_only_when_named(minilm_src, tmp_path, capsys,
                                                         monkeypatch):
    src = st_directory(minilm_src, tmp_path, st_config={"prompts": PROMPTS,
                                                        "default_prompt_name": None})
    ckpt = convert(capsys, monkeypatch, src, tmp_path / "ckpt")
    np.testing.assert_allclose(embed_cli(capsys, monkeypatch, ckpt), reference(src, TEXTS),
                               atol=3e-5)
    np.testing.assert_allclose(embed_cli(capsys, monkeypatch, ckpt, "--prompt-name", "query"),
                               reference(src, TEXTS, prompt="query: "), atol=3e-5)


@pytest.mark.parametrize("pooling, normalize, max_length", [
    ("cls", False, 256), ("max", True, 9), ("mean", False, 7)])
def test_pooling_normalize_and_max_seq_length(pooling, normalize, max_length, minilm_src,
                                              tmp_path, capsys, monkeypatch):
    modes = {f"pooling_mode_{m}": m.split("_")[0] == pooling
             for m in ("cls_token", "mean_tokens", "max_tokens")}
    src = st_directory(minilm_src, tmp_path, pooling=modes, normalize=normalize,
                       bert_config={"max_seq_length": max_length, "do_lower_case": True},
                       st_config={"prompts": {"q": "Query: "}, "default_prompt_name": "q"})
    ckpt = convert(capsys, monkeypatch, src, tmp_path / "ckpt")
    expected = reference(src, TEXTS, prompt="Query: ", lower=True, pooling=pooling,
                         normalize=normalize, max_length=max_length)
    np.testing.assert_allclose(embed_cli(capsys, monkeypatch, ckpt), expected, atol=3e-5)


@pytest.mark.parametrize("where, values, needle", [
    ("st_config", {"prompts": PROMPTS, "truncate_dim": 64}, "truncate_dim"),
    ("st_config", {"prompts": {"q": "x"}, "default_prompt_name": "query"}, "'query'"),
    ("st_config", {"prompts": ["query: "]}, "prompts"),
    ("bert_config", {"max_seq_length": 128, "model_args": {"torch_dtype": "float16"}},
     "model_args"),
    ("pooling", {"include_prompt": False}, "include_prompt"),
])
def test_unsupported_settings_are_refused_in_one_line(where, values, needle, minilm_src,
                                                      tmp_path, capsys, monkeypatch):
    src = st_directory(minilm_src, tmp_path, **{where: values})
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "ckpt", "-q")
    line = one_error_line(err)
    assert code == 1 and needle in line, err
    assert not (tmp_path / "ckpt").exists()


def test_settings_live_in_the_checkpoint_not_the_source(minilm_src, tmp_path, capsys,
                                                        monkeypatch):
    """Read at convert time: removing the source afterwards changes nothing."""
    src = st_directory(minilm_src, tmp_path, st_config={"prompts": PROMPTS,
                                                        "default_prompt_name": "query"})
    ckpt = convert(capsys, monkeypatch, src, tmp_path / "ckpt")
    expected = reference(src, TEXTS, prompt="query: ")
    shutil.rmtree(src)
    np.testing.assert_allclose(embed_cli(capsys, monkeypatch, ckpt), expected, atol=3e-5)
