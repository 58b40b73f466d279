"""One rule for the text of new tokens in every output path (issue 29, kind 2): decode
prompt + new ids and keep what follows the decoded prompt, holding back an incomplete
trailing character and flushing it at the end.

The reference is transformers' streamer semantics computed here with the `tokenizers`
library itself, `decode(prompt + new)[len(decode(prompt)):]`, on three small tokenizers
built in the test: SentencePiece-style "▁" spaces (Metaspace), a byte-level BPE like GPT-2's,
and a byte-fallback one (Llama's decoder) whose output can end inside a multi-byte
character. The model paths run a tiny Llama whose greedy next token is chosen by the test
(tests/successor_model.py), so the new ids are known without running jaxaccel.
"""

import json

import numpy as np
import pytest

import jaxaccel
from cli_runner import run_cli
from jaxaccel.runtime.detokenize import IncrementalDetokenizer, continuation_text

tokenizers = pytest.importorskip("tokenizers")


def metaspace_tokenizer():
    """Words with SentencePiece's "▁" spaces; decoding strips the first leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>", "</s>", "▁Once", "▁upon", "▁a", "▁time", "▁there", "▁was", "▁ü", "ber"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(["</s>"])
    return tok


def byte_level_tokenizer():
    """A byte-level BPE as GPT-2's (Ġ for spaces, one token per byte before merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello there, the café is open.", "Hello café, hello there."] * 4,
                            trainer)
    return tok


def byte_fallback_tokenizer():
    """Llama's: "▁" spaces, characters outside the vocabulary as <0xXX> byte tokens."""
    from tokenizers import Tokenizer, decoders, models

    pieces = ["<unk>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [
        "▁", "▁The", "▁price", "▁is", "▁five"]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>",
                               byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["</s>"])
    return tok


def reference(tok, prompt: list[int], new: list[int]) -> str:
    return tok.decode(prompt + new)[len(tok.decode(prompt)):]


def ids(tok, *tokens: str) -> list[int]:
    return [tok.token_to_id(t) for t in tokens]


# The detokeniser alone ------------------------------------------------------------------------

def test_the_issue_example_keeps_the_space_before_the_new_words():
    tok = metaspace_tokenizer()
    prompt = tok.encode("Once upon a time").ids
    new = ids(tok, "▁there", "▁was")
    assert tok.decode(new) == "there was"  # decoded apart from its context: the bug
    detokenizer = IncrementalDetokenizer(tok, prompt)
    pieces = [detokenizer.push(i) for i in new] + [detokenizer.flush()]
    assert "".join(pieces) == " there was" == reference(tok, prompt, new)
    assert detokenizer.prompt_text + "".join(pieces) == "Once upon a time there was"


def random_ids(tok, rng, count: int) -> list[int]:
    """Ids of up to `count` random units: whole tokens, or (byte fallback) the byte tokens of
    one character of 1-4 bytes, the last unit maybe cut inside its character. (Random bytes
    that are not UTF-8 at all are garbage that a byte-fallback decoder replaces as a whole
    group, rewriting text already printed: no stream can print that.)"""
    vocab = tok.get_vocab_size()
    if tok.token_to_id("<0x41>") is None:
        return rng.integers(0, vocab, count).tolist()
    words = [i for i in range(vocab) if not tok.id_to_token(i).startswith("<0x")]
    out = []
    for _ in range(count):
        if rng.random() < 0.5:
            out.append(int(rng.choice(words)))
        else:
            char = str(rng.choice(list("a2é€𝄞ü")))
            out += [tok.token_to_id(f"<0x{b:02X}>") for b in char.encode()]
    return out[:len(out) - int(rng.integers(0, 3))] or out


@pytest.mark.parametrize("build", [metaspace_tokenizer, byte_level_tokenizer,
                                   byte_fallback_tokenizer])
def test_pieces_join_to_the_reference_and_hold_back_partial_characters(build):
    """Random id sequences: the pieces joined equal the reference, and no piece before the
    flush ends inside a character."""
    tok = build()
    rng = np.random.default_rng(0)
    for _ in range(60):
        prompt = random_ids(tok, rng, int(rng.integers(1, 5)))
        new = random_ids(tok, rng, int(rng.integers(1, 8)))
        detokenizer = IncrementalDetokenizer(tok, prompt)
        pieces = [detokenizer.push(i) for i in new]
        assert not any(p.endswith("\ufffd") for p in pieces)
        pieces.append(detokenizer.flush())
        assert "".join(pieces) == reference(tok, prompt, new)
        assert continuation_text(tok, prompt, new) == reference(tok, prompt, new)


def test_byte_pieces_are_held_until_their_group_is_settled():
    """A byte-fallback decoder replaces a whole run of byte pieces that is not UTF-8, so a
    run is printed once a word piece (or the end) follows it."""
    tok = byte_fallback_tokenizer()
    prompt = ids(tok, "▁The", "▁price", "▁is")
    euro = ids(tok, "▁", "<0xE2>", "<0x82>", "<0xAC>", "▁five")
    detokenizer = IncrementalDetokenizer(tok, prompt)
    assert [detokenizer.push(i) for i in euro] == [" ", "", "", "", "€ five"]
    assert detokenizer.flush() == ""
    cut = IncrementalDetokenizer(tok, prompt)
    assert [cut.push(i) for i in euro[:3]] == [" ", "", ""]
    assert cut.flush() == reference(tok, prompt, euro[:3])[1:] == "\ufffd\ufffd"
    # "€" then the first byte of another character: the decoder replaces all four bytes.
    both = IncrementalDetokenizer(tok, prompt)
    run = euro[:4] + ids(tok, "<0xC3>")
    assert "".join([both.push(i) for i in run] + [both.flush()]) == reference(tok, prompt, run)


# Every output path of a model -------------------------------------------------------------------

CASES = {
    # tokenizer, prompt (text, or token names), chain of new tokens
    "metaspace": (metaspace_tokenizer, "Once upon a time", ["▁there", "▁was"]),
    "metaspace-multibyte": (metaspace_tokenizer, "Once upon a", ["▁ü", "ber", "▁a"]),
    "byte-level": (byte_level_tokenizer, "Hello", ["Ġ", "c", "a", "f", "Ã", "©"]),
    "byte-level-cut": (byte_level_tokenizer, "Hello", ["Ġ", "c", "a", "f", "Ã"]),
    "byte-fallback": (byte_fallback_tokenizer, ["▁The", "▁price", "▁is"],
                      ["▁", "<0xE2>", "<0x82>", "<0xAC>"]),
    "byte-fallback-cut": (byte_fallback_tokenizer, ["▁The", "▁price", "▁is"],
                          ["▁five", "▁", "<0xE2>", "<0x82>"]),
}


@pytest.fixture(scope="module")
def models_by_case(tmp_path_factory):
    """One successor model per case: the prompt's last token starts the case's chain."""
    pytest.importorskip("transformers")
    import successor_model

    out = {}
    for name, (build, prompt, chain) in CASES.items():
        tok = build()
        prompt_ids = (tok.encode(prompt).ids if isinstance(prompt, str)
                      else ids(tok, *prompt))
        chain_ids = ids(tok, *chain)
        assert None not in chain_ids and None not in prompt_ids
        successor = dict(zip([prompt_ids[-1]] + chain_ids[:-1], chain_ids))
        ckpt = successor_model.build(tmp_path_factory.mktemp(name), tok, successor,
                                     filler=chain_ids[-1])
        new = successor_model.chain(successor, prompt_ids[-1], len(chain_ids),
                                    filler=chain_ids[-1])
        assert new == chain_ids
        out[name] = (tok, prompt, prompt_ids, new, ckpt)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_every_output_path_gives_the_reference_text(models_by_case, case, capsys, monkeypatch):
    tok, prompt, prompt_ids, new, ckpt = models_by_case[case]
    want = reference(tok, prompt_ids, new)
    model = jaxaccel.load(ckpt, progress=False)
    given = prompt if isinstance(prompt, str) else [prompt_ids]
    (done,) = model.generate(given, max_new_tokens=len(new), ignore_eos=True)
    assert done.prompt_token_ids == prompt_ids and done.token_ids == new
    assert done.text == want
    streamed = list(model.stream(prompt if isinstance(prompt, str) else prompt_ids,
                                 max_new_tokens=len(new), ignore_eos=True))
    assert "".join(streamed) == want
    assert not any(piece.endswith("\ufffd") for piece in streamed[:-1])

    prompt_args = (["-p", prompt] if isinstance(prompt, str)
                   else ["--prompt-ids", ",".join(map(str, prompt_ids))])
    args = ["generate", ckpt, *prompt_args, "-n", len(new), "--ignore-eos", "-q"]
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert out == tok.decode(prompt_ids) + want + "\n"
    code, out, err = run_cli(capsys, monkeypatch, *args, "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["tokens"] == [prompt_ids + new]
    assert payload["text"] == [tok.decode(prompt_ids) + want]


def test_the_issue_example_through_the_cli_stream(models_by_case, capsys, monkeypatch):
    *_, ckpt = models_by_case["metaspace"]
    code, out, _ = run_cli(capsys, monkeypatch, "generate", ckpt, "-p", "Once upon a time",
                           "-n", 2, "--ignore-eos", "-q")
    assert code == 0 and out == "Once upon a time there was\n"
