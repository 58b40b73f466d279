"""Bad inputs get one clear line and exit code 2 (usage) — never a traceback."""

import pathlib

import pytest
from cli_runner import one_error_line, run_cli

USAGE = 2


@pytest.fixture
def cli(capsys, monkeypatch):
    return lambda *args: run_cli(capsys, monkeypatch, *args)


def test_long_text_is_truncated_with_a_warning(cli, minilm_ckpt):
    code, out, err = cli("embed", minilm_ckpt, "--text", "word " * 2000, "--json")
    assert code == 0, err
    assert "warning: 1 input(s) truncated to 256 tokens" in err


def test_long_text_is_refused_with_no_truncate(cli, minilm_ckpt, tmp_path):
    out = tmp_path / "v.npy"
    code, _, err = cli("embed", minilm_ckpt, "--text", "short", "--text", "word " * 2000,
                       "--no-truncate", "--out", out)
    assert code == USAGE
    line = one_error_line(err)
    assert "input 2 has 2002 tokens, more than the maximum 256" in line
    assert not out.exists()


@pytest.mark.parametrize("content, needle", [
    (b"", "the file is empty"),
    (b"caf\xc3\xa9\nna\xefve\n", "not UTF-8 (line 2, byte 8)"),
], ids=["empty", "not-utf8"])
def test_bad_input_file(cli, minilm_ckpt, tmp_path, content, needle):
    path = tmp_path / "texts.txt"
    path.write_bytes(content)
    code, _, err = cli("embed", minilm_ckpt, "--input", path)
    assert code == USAGE
    assert needle in one_error_line(err) and str(path) in err


def test_missing_input_file(cli, minilm_ckpt, tmp_path):
    code, _, err = cli("embed", minilm_ckpt, "--input", tmp_path / "nope.txt")
    assert code == USAGE and "cannot be read" in one_error_line(err)


def test_text_and_input_together(cli, minilm_ckpt, tmp_path):
    code, _, err = cli("embed", minilm_ckpt, "--text", "a", "--input", tmp_path / "x")
    assert code == USAGE and "not both" in one_error_line(err)


@pytest.mark.parametrize("command", ["embed", "plan"])
@pytest.mark.parametrize("flags, needle", [
    # cpu_only: the messages count the 8 simulated CPU devices of conftest.py.
    pytest.param(["--mesh", "model=3"], "needs 3 devices; 8 are available",
                 marks=pytest.mark.cpu_only),
    pytest.param(["--mesh", "data=16"], "needs 16 devices; 8 are available",
                 marks=pytest.mark.cpu_only),
    (["--mesh", "model=0"], "must be >= 1 or -1"),
    (["--mesh", "model=two"], "must be an integer"),
    (["--mesh", "tensor=2"], "expected comma-separated AXIS=SIZE"),
    (["--mesh", "data=-1,model=-1"], "at most one axis may be -1"),
    (["--rules", "fsdp"], "unknown rule table 'fsdp'"),
    (["--rule", "heads=tensor"], "mesh axis must be one of"),
    (["--rule", "attention=model"], "expected LOGICAL=MESH_AXIS"),
    (["--device-memory", "lots"], "--device-memory: expected a size"),
    (["--host-memory-budget", "-1GiB"], "--host-memory-budget: expected a size"),
])
def test_bad_layout_flags(cli, minilm_ckpt, command, flags, needle):
    args = ["--text", "hello"] if command == "embed" else []
    code, out, err = cli(command, minilm_ckpt, *args, *flags)
    assert code == USAGE, err
    assert needle in one_error_line(err)
    assert out == ""


@pytest.mark.cpu_only  # model=8: 8 simulated CPU devices (XLA_FLAGS in conftest.py)
def test_mesh_not_dividing_heads_warns(cli, minilm_ckpt):
    # 12 heads on model=8: the rules replicate attention (by design); the plan says so.
    code, out, err = cli("plan", minilm_ckpt, "--mesh", "model=8")
    assert code == 0, err
    assert "model=8 does not divide heads (12)" in " ".join(out.split())


def test_bad_dtype_and_batch(cli, minilm_ckpt):
    code, _, err = cli("embed", minilm_ckpt, "--text", "a", "--dtype", "int8")
    assert code == USAGE and "--dtype must be one of" in one_error_line(err)
    code, _, err = cli("embed", minilm_ckpt, "--text", "a", "--batch-size", "0")
    assert code == USAGE and "--batch-size" in err and "Traceback" not in err


def test_not_a_checkpoint(cli, tmp_path):
    code, _, err = cli("embed", tmp_path, "--text", "a")
    assert code == 1 and "jaxaccel.json: missing" in one_error_line(err)


# --------------------------------------------------------------- generate (decoder command)

GENERATE = pathlib.Path(__file__).parents[1] / "jaxaccel" / "cli" / "generate.py"
needs_generate = pytest.mark.skipif(not GENERATE.exists(),
                                    reason="the generate command is not part of this build yet")


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    # The reference extra (torch, transformers) builds the model; without it, skip, not error.
    torch = pytest.importorskip("torch", reason="reference extra (torch) not installed")
    transformers = pytest.importorskip("transformers", reason="reference extra not installed")

    from jaxaccel.conversion.hf import convert

    root = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "src", safe_serialization=True)
    convert(root / "src", root / "ckpt")
    return root / "ckpt"


@needs_generate
@pytest.mark.parametrize("flags, needle", [
    (["--prompt-ids", "1,2,97"], "vocab"),
    (["--prompt-ids", "1,-2"], ""),
    (["--prompt-ids", "1,2", "--max-new-tokens", "-1"], "max-new-tokens"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "1000000000"], ""),
])
def test_bad_generate_inputs(cli, gpt2_ckpt, flags, needle):
    code, _, err = cli("generate", gpt2_ckpt, *flags)
    assert code == USAGE, err
    assert needle in one_error_line(err).lower() or needle in err
