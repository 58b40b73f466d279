"""One choice's streamed deltas (`serving.text.ChoiceStream`) against the whole decoded text
(`tokenizers` decode, the reference): deltas join to it, never end inside a character, never
show a stop string, and the text is cut before the first stop string as vLLM cuts it."""

import pathlib

import pytest
from serving_fixture import write_tokenizer
from tokenizers import Tokenizer

from jaxaccel.inputs.tokenizer import TextTokenizer
from jaxaccel.serving.text import ChoiceStream

TEXT = "héllo wörld, ça va? 日本語 € The quick brown fox"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    files = write_tokenizer(pathlib.Path(tmp_path_factory.mktemp("tok")), 300)
    return TextTokenizer(files["tokenizer.json"])


def stream(tok, ids, stops=(), prompt=()):
    choice = ChoiceStream(tok, prompt, stops)
    pieces = [choice.update(ids[:n], n == len(ids))[0] for n in range(1, len(ids) + 1)]
    return pieces


def test_deltas_join_to_the_decoded_text_and_never_split_a_character(tok):
    raw = Tokenizer.from_file(str(tok.path))
    ids = raw.encode(TEXT).ids
    pieces = stream(tok, ids)
    assert "".join(pieces) == raw.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    # byte-level ids one byte at a time: a 3-byte character arrives whole, once
    byte_ids = [raw.token_to_id(c) for c in raw.encode("日").tokens[0]]
    if None not in byte_ids and len(byte_ids) > 1:
        assert "".join(stream(tok, byte_ids)) == "日"


@pytest.mark.parametrize("stops", [["fox"], ["ça va", "quick"], ["wörld,"], ["zzz"]])
def test_stop_strings_are_cut_and_never_streamed(tok, stops):
    raw = Tokenizer.from_file(str(tok.path))
    ids = raw.encode(TEXT).ids
    found = [TEXT.find(s) for s in stops if s in TEXT]
    want = TEXT[:min(found)] if found else TEXT
    pieces = stream(tok, ids, stops)
    assert "".join(pieces) == want
    assert not any(s in "".join(pieces[:k]) for s in stops for k in range(len(pieces) + 1))


def test_no_tokenizer_gives_ids_only():
    choice = ChoiceStream(None, [1, 2])
    assert choice.update([5], False) == ("", [5])
    assert choice.update([5, 6, 7], True) == ("", [6, 7])
    assert choice.token_ids == [5, 6, 7]
