"""`jaxaccel generate CKPT`: text generation from a decoder checkpoint (GPT-2, Llama family)."""

from __future__ import annotations

import json
import pathlib
from typing import List, Optional

import typer

from jaxaccel.utils import progress
from jaxaccel.cli import options
from jaxaccel.errors import InputError, UsageError
from jaxaccel.utils.files import read_lines, write_atomically
from jaxaccel.utils.units import parse_bytes


def parse_prompt_ids(text: str) -> list[list[int]]:
    """'1,2,3;4,5' -> [[1, 2, 3], [4, 5]]; UsageError for an empty or malformed prompt."""
    if not text.strip():
        raise UsageError("--prompt-ids: the prompt is empty; give at least one token id")
    prompts = []
    for part in text.split(";"):
        try:
            ids = [int(tok) for tok in part.replace(" ", "").split(",") if tok]
        except ValueError:
            raise UsageError(f"--prompt-ids: expected comma-separated integers with ';' between "
                             f"prompts, got {part!r}") from None
        if not ids:
            raise UsageError(f"--prompt-ids: empty prompt in {text!r}")
        prompts.append(ids)
    return prompts


def sampling_from(greedy: bool, temperature: Optional[float], top_k: int, top_p: float,
                  seed: int):
    # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
    from jaxaccel.runtime.sampling import Sampling

    if temperature is not None and temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {temperature}")
    sampled = temperature is not None and temperature > 0
    if greedy and (sampled or top_k or top_p < 1.0):
        raise UsageError("--greedy cannot be combined with --temperature/--top-k/--top-p")
    if not sampled and (top_k or top_p < 1.0):
        raise UsageError("--top-k/--top-p need --temperature > 0 (sampling)")
    try:
        return Sampling(temperature=temperature if sampled else 0.0, top_k=top_k, top_p=top_p,
                        seed=seed)
    except ValueError as err:
        raise UsageError(str(err)) from None


class TextStream:
    """Prints one prompt's text as tokens arrive (decoding the whole suffix each time, so a
    character split over several tokens appears once complete)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, tokens: list[int | None]) -> None:
        if tokens[0] is None:
            return
        self.ids.append(tokens[0])
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        ckpt: str = typer.Argument(..., help="Decoder checkpoint directory (a text "
                                            "generation family, local or a bucket URL)."),
        prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt text "
                                                   "(repeatable; needs the checkpoint's "
                                                   "tokenizer)."),
        prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Token ids, e.g. "
                                                 "'1,2,3;4,5' for two prompts."),
        input_file: Optional[pathlib.Path] = typer.Option(
            None, "--input", "-i", help="Prompts from a file: one per line, or JSON Lines with "
            'a "prompt" string per line.'),
        output_file: Optional[pathlib.Path] = typer.Option(
            None, "--output", "-o", help="Also write JSON Lines: one completion per prompt "
            "(prompt_token_ids, token_ids, text, finish_reason: eos, stop or length)."),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="At most this many "
                                            "new tokens per prompt (fewer at EOS). The limit: "
                                            "prompt + N - 1 <= the model's maximum positions "
                                            "(the last new token is never fed back)."),
        greedy: bool = typer.Option(False, "--greedy", help="Argmax decoding (the default "
                                    "unless --temperature > 0)."),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling "
                                                    "temperature; 0 or unset is greedy."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling."),
        seed: int = typer.Option(0, "--seed"),
        ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at the "
                                        "model's EOS tokens (by default every id of config.json "
                                        "/ generation_config.json, as recorded at convert)."),
        dtype: Optional[str] = options.DTYPE,
        mesh: Optional[str] = options.MESH,
        rules: str = options.RULES,
        rule: Optional[str] = options.RULE_OVERRIDES,
        budget: str = options.HOST_MEMORY_BUDGET,
        microbatches: Optional[int] = options.MICROBATCHES,
        device_memory: Optional[str] = options.DEVICE_MEMORY,
        verify_checksums: bool = options.VERIFY_CHECKSUMS,
        kernels: Optional[bool] = typer.Option(
            None, "--kernels/--no-kernels", help="bfloat16 on one CPU device: read the matmul "
            "weights packed, through jaxaccel's compiled kernel (built with the system C++ "
            "compiler on first use, then cached). Default: wherever it applies; --kernels "
            "insists (an error where it cannot), --no-kernels keeps XLA's own dots."),
        quantize: Optional[str] = options.QUANTIZE,
        group_size: int = options.GROUP_SIZE,
        quantize_head: bool = options.QUANTIZE_HEAD,
        compile_cache: Optional[pathlib.Path] = options.COMPILE_CACHE,
        no_compile_cache: bool = options.NO_COMPILE_CACHE,
        as_json: bool = options.JSON,
        quiet: bool = options.QUIET,
    ) -> None:
        """Generate continuations: jitted prefill + KV-cache decode, greedy or sampled,
        tensor-parallel on `model` and data-parallel on `data`. Streams text unless --json."""
        run_generate(ckpt, prompt, prompt_ids, max_new_tokens, sampling_from(
            greedy, temperature, top_k, top_p, seed), ignore_eos, dtype, mesh, rules, rule,
            budget, microbatches, device_memory, verify_checksums, as_json, quiet, kernels,
            compile_cache=compile_cache, no_compile_cache=no_compile_cache,
            input_file=input_file, output_file=output_file,
            quantize=options.scheme_from(quantize, group_size, quantize_head))


def run_generate(ckpt, prompt, prompt_ids, max_new_tokens, sampling, ignore_eos, dtype, mesh,
                 rules, rule, budget, microbatches, device_memory, verify_checksums, as_json,
                 quiet, kernels=None, *, compile_cache=None, no_compile_cache=False,
                 input_file=None, output_file=None, quantize=None) -> None:
    """Check the request (before reading a byte of weights), restore while compiling,
    generate, print: the body of `jaxaccel generate`."""
    # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
    import jax

    from jaxaccel.parallel import distributed
    from jaxaccel.startup import coldstart
    from jaxaccel.runtime import compile_cache as xla_cache
    from jaxaccel.runtime.generate import check_prompts
    from jaxaccel.model import Model

    if sum(map(bool, (prompt, prompt_ids is not None, input_file))) != 1:
        raise UsageError("give exactly one of --prompt TEXT (repeatable), --prompt-ids or "
                         "--input FILE")
    prompt = read_prompts(input_file) if input_file else prompt
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    given_ids = parse_prompt_ids(prompt_ids) if prompt_ids is not None else None
    plan = coldstart.plan_for("generate", ckpt, options.layout_from(mesh, rules, rule), dtype,
                              device_memory=options.device_memory_from(device_memory),
                              max_new_tokens=max_new_tokens, quantize=quantize)
    tokenizer = coldstart.tokenizer_for(plan)
    if prompt and tokenizer is None:
        raise UsageError(f"{ckpt} has no tokenizer.json; use --prompt-ids")
    ids = given_ids if given_ids is not None else [tokenizer.encode_one(t) for t in prompt]
    try:
        check_prompts(plan.config, ids, max_new_tokens)
    except ValueError as err:
        raise UsageError(str(err)) from None
    xla_cache.configure(compile_cache, enabled=not no_compile_cache)
    output = distributed.is_output_process()
    # Streaming runs the host loop, which is not multi-host safe: stream on one process only.
    streaming = bool(tokenizer and not as_json and len(ids) == 1 and output
                     and jax.process_count() == 1)
    started = coldstart.start_generator(
        ckpt, plan=plan, prompt_lengths=[len(p) for p in ids],
        max_new_tokens=max_new_tokens, sampling=sampling, microbatches=microbatches,
        packed_weights=kernels, loop="host" if streaming else "device",
        host_memory_budget=parse_bytes(budget, "--host-memory-budget"),
        verify_checksums=verify_checksums, quiet=quiet)
    model = Model(started.loaded, generator=started.generator)
    stream = TextStream(tokenizer) if streaming else None
    if stream:
        print(tokenizer.decode(ids[0]), end="", flush=True)
    completions = model.complete(ids, max_new_tokens, sampling, ignore_eos=ignore_eos,
                                 on_step=stream)
    if output:
        _print_result(completions, tokenizer, as_json, streamed=stream is not None)
        if output_file:
            write_jsonl(output_file, [_completion_json(c) for c in completions])
        _status(started.generator.timings, len(ids), quiet)


def _completion_json(completion) -> dict:
    return {"prompt_token_ids": completion.prompt_token_ids, "token_ids": completion.token_ids,
            "text": completion.text, "finish_reason": completion.finish_reason}


def _print_result(completions, tokenizer, as_json: bool, streamed: bool) -> None:
    tokens = [c.prompt_token_ids + c.token_ids for c in completions]
    if as_json:
        payload = {"tokens": tokens, "finish_reason": [c.finish_reason for c in completions]}
        if tokenizer is not None:
            payload["text"] = [tokenizer.decode(t) for t in tokens]
        print(json.dumps(payload))
    elif streamed:
        print()
    else:
        for row in tokens:
            print(tokenizer.decode(row) if tokenizer else " ".join(map(str, row)))


def _status(timings: dict, prompts: int, quiet: bool) -> None:
    """Time to first token and decode speed of the run, on stderr."""
    decode_s = timings["total_s"] - timings["first_token_s"]
    decoded = max(0, timings["new_tokens"] - prompts)  # each prompt's first token is prefill's
    speed = f"{decoded / decode_s:.1f} tok/s" if decode_s > 0 and decoded else "n/a"
    progress.say(f"generated {timings['new_tokens']} token(s) for {prompts} prompt(s): first "
                 f"token after {1e3 * timings['first_token_s']:.0f} ms, decode {speed}", quiet)


def read_prompts(path: pathlib.Path) -> list[str]:
    """--input: one prompt per line, or JSON Lines with a "prompt" string per line."""
    lines = [line for line in read_lines(path, "--input") if line.strip()]
    if not lines[0].lstrip().startswith("{"):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            prompts.append(json.loads(line)["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"--input {path}: line {number} is not a JSON object with a "
                             f'"prompt" string') from None
        if not isinstance(prompts[-1], str):
            raise InputError(f'--input {path}: line {number}: "prompt" must be a string')
    return prompts


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    """Write JSON Lines atomically: a reader never sees half a file."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))
