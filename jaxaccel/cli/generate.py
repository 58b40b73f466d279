"""`jaxaccel generate CKPT`: text generation from a decoder checkpoint (GPT-2, Llama family)."""

from __future__ import annotations

import json
import pathlib
from typing import List, Optional

import typer

from jaxaccel.utils import progress
from jaxaccel.cli import options
from jaxaccel.errors import InputError, UsageError
from jaxaccel.runtime.detokenize import IncrementalDetokenizer
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


def settings_from(greedy: bool, temperature: Optional[float], top_k: int, top_p: float,
                  seed: int) -> dict:
    """The sampling flags as `Model.generate` takes them (an unset flag is None), checked by
    the same validator (`jaxaccel.runtime.requests`) once the checkpoint's defaults are read."""
    return {"greedy": True if greedy else None, "temperature": temperature,
            "top_k": top_k or None, "top_p": None if top_p == 1.0 else top_p, "seed": seed}


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
        greedy: bool = typer.Option(False, "--greedy", help="Argmax decoding. Without it and "
                                    "without --temperature, decoding follows the checkpoint's "
                                    "generation_config.json as transformers and "
                                    "`Model.generate` do (greedy unless it says do_sample)."),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling "
                                                    "temperature; 0 is greedy."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely (needs "
                                  "a temperature > 0, given or the checkpoint's)."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (needs a "
                                    "temperature > 0, given or the checkpoint's)."),
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
        kernels: Optional[bool] = options.KERNELS,
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
        run_generate(ckpt, prompt, prompt_ids, max_new_tokens, settings_from(
            greedy, temperature, top_k, top_p, seed), ignore_eos, dtype, mesh, rules, rule,
            budget, microbatches, device_memory, verify_checksums, as_json, quiet, kernels,
            compile_cache=compile_cache, no_compile_cache=no_compile_cache,
            input_file=input_file, output_file=output_file,
            quantize=options.scheme_from(quantize, group_size, quantize_head))


def run_generate(ckpt, prompt, prompt_ids, max_new_tokens, settings, ignore_eos, dtype, mesh,
                 rules, rule, budget, microbatches, device_memory, verify_checksums, as_json,
                 quiet, kernels=None, *, compile_cache=None, no_compile_cache=False,
                 input_file=None, output_file=None, quantize=None) -> None:
    """Check the request (before reading a byte of weights), restore while compiling,
    generate, print: the body of `jaxaccel generate`. `settings`: see `settings_from`."""
    # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
    from jaxaccel.model import Model
    from jaxaccel.parallel import distributed
    from jaxaccel.runtime import compile_cache as xla_cache
    from jaxaccel.runtime import requests
    from jaxaccel.startup.start import start

    requests.check_max_new_tokens(max_new_tokens)  # before the plan sizes a cache with it
    if sum(map(bool, (prompt, prompt_ids is not None, input_file))) != 1:
        raise UsageError("give exactly one of --prompt TEXT (repeatable), --prompt-ids or "
                         "--input FILE")
    prompt = read_prompts(input_file) if input_file else prompt
    given_ids = parse_prompt_ids(prompt_ids) if prompt_ids is not None else None
    job = GenerateJob(prompt, given_ids, max_new_tokens, settings, ignore_eos, as_json,
                      microbatches, kernels)
    xla_cache.configure(compile_cache, enabled=not no_compile_cache)
    started = start(ckpt, options.layout_from(mesh, rules, rule), dtype, task="generate",
                    quantize=quantize, device_memory=options.device_memory_from(device_memory),
                    batch=len(given_ids or prompt), max_new_tokens=max_new_tokens,
                    prepare=job.prepare, microbatches=microbatches,
                    host_memory_budget=parse_bytes(budget, "--host-memory-budget"),
                    verify_checksums=verify_checksums, quiet=quiet)
    model = Model(started.loaded, microbatches=microbatches, runner=started.runner)
    completions = job.run(model)
    if distributed.is_output_process():
        _print_result(completions, job.tokenizer, as_json, streamed=job.streaming)
        if output_file:
            write_jsonl(output_file, [_completion_json(c) for c in completions])
        _status(started.generator.timings, len(job.ids), quiet)


class GenerateJob:
    """One `generate` run: checked and tokenised from the plan (before a byte of weights is
    read), its programs compiled while they stream in, then run and streamed."""

    def __init__(self, prompts, given_ids, max_new_tokens, settings, ignore_eos, as_json,
                 microbatches, kernels):
        self.prompts, self.ids = prompts, given_ids
        self.max_new_tokens, self.settings, self.ignore_eos = max_new_tokens, settings, ignore_eos
        self.as_json, self.microbatches, self.kernels = as_json, microbatches, kernels
        self.tokenizer = self.request = None
        self.streaming = False

    def prepare(self, plan):
        """`start`'s prepare: the request checked as `Model.generate` checks it (with the
        checkpoint's sampling defaults), prompts tokenised and checked, a Generator built."""
        # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
        import jax

        from jaxaccel.parallel import distributed
        from jaxaccel.runtime import requests
        from jaxaccel.runtime.generate import Generator
        from jaxaccel.startup.coldstart import tokenizer_for

        self.request = requests.request(self.max_new_tokens, **self.settings,
                                        ignore_eos=self.ignore_eos,
                                        defaults=plan.manifest.generation)
        self.tokenizer = tokenizer_for(plan)
        if self.ids is None:
            if self.tokenizer is None:
                raise UsageError(f"{plan.path} has no tokenizer.json; use --prompt-ids")
            self.ids = [self.tokenizer.encode_one(t) for t in self.prompts]
        requests.check_prompts(plan.config, self.ids, self.max_new_tokens)
        # Streaming runs the host loop, which is not multi-host safe: one process only.
        self.streaming = bool(self.tokenizer and not self.as_json and len(self.ids) == 1
                              and distributed.is_output_process() and jax.process_count() == 1)
        generator = Generator.from_plan(plan, microbatches=self.microbatches,
                                        packed_weights=self.kernels)
        lengths, loop = [len(p) for p in self.ids], "host" if self.streaming else "device"
        return generator, lambda: generator.compile(lengths, self.max_new_tokens,
                                                    self.request.sampling, loop)

    def run(self, model) -> list:
        """Generate; a streamed run prints the prompt, then each piece as it is final."""
        stream = None
        if self.streaming:
            detokenizer = IncrementalDetokenizer(self.tokenizer, self.ids[0])
            stream = _Printer(detokenizer)
            print(detokenizer.prompt_text, end="", flush=True)
        completions = model.complete(self.ids, self.request.max_new_tokens,
                                     self.request.sampling, ignore_eos=self.request.ignore_eos,
                                     on_step=stream)
        if stream is not None:
            print(stream.detokenizer.flush(), end="", flush=True)
        return completions


class _Printer:
    """The Generator's `on_step` callback of a streamed run: prints row 0's final text."""

    def __init__(self, detokenizer):
        self.detokenizer = detokenizer

    def __call__(self, tokens: list[int | None]) -> None:
        if tokens[0] is not None and (piece := self.detokenizer.push(tokens[0])):
            print(piece, end="", flush=True)


def _completion_json(completion) -> dict:
    return {"prompt_token_ids": completion.prompt_token_ids, "token_ids": completion.token_ids,
            "text": completion.text, "finish_reason": completion.finish_reason}


def _print_result(completions, tokenizer, as_json: bool, streamed: bool) -> None:
    """--json, or the texts (prompt + continuation, the continuation as `Completion.text`
    gives it: the rule of every output path, `runtime.detokenize`); token ids without a
    tokenizer."""
    tokens = [c.prompt_token_ids + c.token_ids for c in completions]
    texts = ([tokenizer.decode(c.prompt_token_ids) + c.text for c in completions]
             if tokenizer is not None else None)
    if as_json:
        payload = {"tokens": tokens, "finish_reason": [c.finish_reason for c in completions]}
        if texts is not None:
            payload["text"] = texts
        print(json.dumps(payload))
    elif streamed:
        print()
    else:
        for row, text in zip(tokens, texts or [None] * len(tokens)):
            print(text if text is not None else " ".join(map(str, row)))


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
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))
