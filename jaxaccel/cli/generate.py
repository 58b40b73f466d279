"""`jaxaccel generate CKPT`: text generation from a decoder checkpoint (GPT-2, Llama family)."""

from __future__ import annotations

import json
import os
import pathlib
import time
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


# The command's own options (the shared ones are in cli/options.py).
PROMPT_OPTION = typer.Option(None, "--prompt", "-p", help="Prompt text "
    "(repeatable; needs the checkpoint's "
    "tokenizer).")
PROMPT_IDS_OPTION = typer.Option(None, "--prompt-ids", help="Token ids, e.g. "
    "'1,2,3;4,5' for two prompts.")
INPUT_FILE_OPTION = typer.Option(
    None, "--input", "-i", help="Prompts from a file: one per line, or JSON Lines with "
    'a "prompt" (text) or "prompt_ids" (list of ints) per line, plus optional '
    '"max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", '
    '"stop_token_ids", "ignore_eos" over the flags (line i without a "seed" gets '
    '--seed + i - 1). The whole file is checked before any compute.')
OUTPUT_FILE_OPTION = typer.Option(
    None, "--output", "-o", help="Also write JSON Lines: one completion per prompt "
    "(prompt_token_ids, token_ids, text, finish_reason: eos, stop or length).")
MAX_NEW_TOKENS_OPTION = typer.Option(32, "--max-new-tokens", "-n", help="At most this many "
    "new tokens per prompt (fewer at EOS). The limit: "
    "prompt + N - 1 <= the model's maximum positions "
    "(the last new token is never fed back).")
GREEDY_OPTION = typer.Option(False, "--greedy", help="Argmax decoding. Without it and "
    "without --temperature, decoding follows the checkpoint's "
    "generation_config.json as transformers and "
    "`Model.generate` do (greedy unless it says do_sample).")
TEMPERATURE_OPTION = typer.Option(None, "--temperature", help="Sampling "
    "temperature; 0 is greedy.")
TOP_K_OPTION = typer.Option(0, "--top-k", help="Sample among the k most likely (needs "
    "a temperature > 0, given or the checkpoint's).")
TOP_P_OPTION = typer.Option(1.0, "--top-p", help="Nucleus sampling (needs a "
    "temperature > 0, given or the checkpoint's).")
IGNORE_EOS_OPTION = typer.Option(False, "--ignore-eos", help="Do not stop at the "
    "model's EOS tokens (by default every id of config.json "
    "/ generation_config.json, as recorded at convert).")


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        ckpt: str = typer.Argument(..., help="Decoder checkpoint directory (a text "
                                            "generation family, local or a bucket URL)."),
        prompt: Optional[List[str]] = PROMPT_OPTION,
        prompt_ids: Optional[str] = PROMPT_IDS_OPTION,
        input_file: Optional[pathlib.Path] = INPUT_FILE_OPTION,
        output_file: Optional[pathlib.Path] = OUTPUT_FILE_OPTION,
        max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
        greedy: bool = GREEDY_OPTION,
        temperature: Optional[float] = TEMPERATURE_OPTION,
        top_k: int = TOP_K_OPTION,
        top_p: float = TOP_P_OPTION,
        seed: int = typer.Option(0, "--seed"),
        ignore_eos: bool = IGNORE_EOS_OPTION,
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
        max_num_seqs: int = options.MAX_NUM_SEQS,
        max_num_batched_tokens: int = options.MAX_NUM_BATCHED_TOKENS,
        kv_cache_memory: Optional[str] = options.KV_CACHE_MEMORY,
        no_prefix_cache: bool = options.NO_PREFIX_CACHE,
        as_json: bool = options.JSON,
        quiet: bool = options.QUIET,
    ) -> None:
        """Generate continuations with the generation engine: continuous batching over a
        paged KV cache (chunked prefill, prefix caching), greedy or sampled per request,
        tensor-parallel on `model` and data-parallel on `data`. Outputs come in input order.
        Streams text for one prompt unless --json. A pipeline-parallel mesh (stage > 1)
        decodes in one static left-padded batch instead (the engine does not run stage
        meshes yet; the engine flags do not apply there)."""
        run_generate(ckpt, prompt, prompt_ids, max_new_tokens, settings_from(
            greedy, temperature, top_k, top_p, seed), ignore_eos, dtype, mesh, rules, rule,
            budget, microbatches, device_memory, verify_checksums, as_json, quiet, kernels,
            compile_cache=compile_cache, no_compile_cache=no_compile_cache,
            input_file=input_file, output_file=output_file,
            quantize=options.scheme_from(quantize, group_size, quantize_head),
            engine_args=options.engine_args_from(max_num_seqs, max_num_batched_tokens,
                                                 kv_cache_memory, no_prefix_cache))


def run_generate(ckpt, prompt, prompt_ids, max_new_tokens, settings, ignore_eos, dtype, mesh,
                 rules, rule, budget, microbatches, device_memory, verify_checksums, as_json,
                 quiet, kernels=None, *, compile_cache=None, no_compile_cache=False,
                 input_file=None, output_file=None, quantize=None, engine_args=None) -> None:
    """Check the requests (before reading a byte of weights), restore while compiling,
    generate through the engine, print and write outputs in input order as they complete:
    the body of `jaxaccel generate`. `settings`: see `settings_from`."""
    # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
    from jaxaccel.model import Model
    from jaxaccel.runtime import compile_cache as xla_cache
    from jaxaccel.runtime import requests
    from jaxaccel.startup.start import start

    requests.check_max_new_tokens(max_new_tokens)  # before the plan sizes a cache with it
    if sum(map(bool, (prompt, prompt_ids is not None, input_file))) != 1:
        raise UsageError("give exactly one of --prompt TEXT (repeatable), --prompt-ids or "
                         "--input FILE")
    engine_args = engine_args or {}
    if input_file:
        records = read_records(input_file)
    elif prompt_ids is not None:
        records = [{"prompt_ids": ids} for ids in parse_prompt_ids(prompt_ids)]
    else:
        records = [{"prompt": text} for text in prompt]
    job = GenerateJob(records, input_file, max_new_tokens, settings, ignore_eos, as_json,
                      microbatches, kernels, engine_args)
    xla_cache.configure(compile_cache, enabled=not no_compile_cache)
    started = start(ckpt, options.layout_from(mesh, rules, rule), dtype, task="generate",
                    quantize=quantize, device_memory=options.device_memory_from(device_memory),
                    batch=min(len(records), engine_args.get("max_num_seqs", 64)),
                    max_new_tokens=max(r.get("max_new_tokens", max_new_tokens)
                                       for r in records),
                    prepare=job.prepare, microbatches=microbatches,
                    host_memory_budget=parse_bytes(budget, "--host-memory-budget"),
                    verify_checksums=verify_checksums, quiet=quiet)
    model = Model(started.loaded, microbatches=microbatches, runner=started.runner)
    model.engine(**engine_args)
    job.run(model, output_file, quiet)
    _compile_status(job.compiled, started.generator.traces.get("engine_step", 0), quiet)


class GenerateJob:
    """One `generate` run: every request checked and tokenised from the plan (before a byte
    of weights is read), then run through the engine with outputs in input order."""

    def __init__(self, records, input_file, max_new_tokens, settings, ignore_eos, as_json,
                 microbatches, kernels, engine_args=None):
        self.records, self.input_file = records, input_file
        self.max_new_tokens, self.settings, self.ignore_eos = max_new_tokens, settings, ignore_eos
        self.as_json, self.microbatches, self.kernels = as_json, microbatches, kernels
        self.tokenizer = None
        self.ids: list[list[int]] = []
        self.requests: list = []  # runtime.requests.Request, one per prompt
        self.stop_token_ids: list[tuple[int, ...]] = []
        self.engine_args = engine_args or {}
        self.compiled = {"programs": 0, "seconds": 0.0}  # step programs compiled at start-up
        self.streaming = False

    def prepare(self, plan):
        """`start`'s prepare: every request checked as `Model.generate` checks it (with the
        checkpoint's sampling defaults; an --input line's own fields over the flags),
        prompts tokenised and checked, a Generator built; the engine's step programs that
        these requests will meet compile while the weights restore (`engine.warmup`)."""
        # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
        import jax

        from jaxaccel.parallel import distributed
        from jaxaccel.runtime.generate import Generator
        from jaxaccel.startup.coldstart import tokenizer_for

        self.tokenizer = tokenizer_for(plan)
        for number, record in enumerate(self.records, 1):
            ids, request = self._request(plan, number, record)
            self.ids.append(ids)
            self.requests.append(request)
            self.stop_token_ids.append(tuple(record.get("stop_token_ids", ())))
        # Streaming prints one prompt's text as it comes: one process, one prompt.
        self.streaming = bool(self.tokenizer and not self.as_json and len(self.ids) == 1
                              and distributed.is_output_process() and jax.process_count() == 1)
        generator = Generator.from_plan(plan, microbatches=self.microbatches,
                                        packed_weights=self.kernels)
        return generator, lambda: self._precompile(generator)

    def _precompile(self, generator) -> None:
        # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
        from jaxaccel.engine.requests import Request, SamplingParams
        from jaxaccel.engine.warmup import precompile

        lengths_only = [Request(i, ids, SamplingParams(max_tokens=r.max_new_tokens))
                        for i, (ids, r) in enumerate(zip(self.ids, self.requests))]
        self.compiled = precompile(generator, lengths_only, **self.engine_args)

    def _request(self, plan, number: int, record: dict):
        """(prompt ids, checked request) of one record; errors name the --input line."""
        from jaxaccel.runtime import requests  # deferred: as above, jax

        where = f"--input {self.input_file}: line {number}: " if self.input_file else ""
        try:
            _check_record(record)
            if "prompt" in record:
                if self.tokenizer is None:
                    raise UsageError(f"{plan.path} has no tokenizer.json; give token ids "
                                     f"(--prompt-ids, or \"prompt_ids\" in --input lines)")
                ids = self.tokenizer.encode_one(record["prompt"])
            else:
                ids = list(record["prompt_ids"])
            settings = {**self.settings, "seed": self.settings["seed"] + number - 1}
            fields = {k: record[k] for k in ("temperature", "top_k", "top_p", "seed")
                      if k in record}
            if fields.keys() & {"temperature", "top_k", "top_p"}:
                settings["greedy"] = None  # a line's own sampling settings win over --greedy
            settings.update(fields)
            request = requests.request(record.get("max_new_tokens", self.max_new_tokens),
                                       **settings, stop=record.get("stop"),
                                       ignore_eos=record.get("ignore_eos", self.ignore_eos),
                                       defaults=plan.manifest.generation)
            requests.check_prompts(plan.config, [ids], request.max_new_tokens)
        except UsageError as err:
            if not where:
                raise
            raise InputError(f"{where}{err}") from None
        return ids, request

    def run(self, model, output_file, quiet: bool) -> None:
        """Generate; print and write each completion in input order as soon as it and all
        before it are done (a streamed single prompt prints its pieces as they come)."""
        from jaxaccel.parallel import distributed  # deferred: imports jax

        printing = distributed.is_output_process()
        stream = None
        if self.streaming:
            detokenizer = IncrementalDetokenizer(self.tokenizer, self.ids[0])
            stream = _Printer(detokenizer)
            print(detokenizer.prompt_text, end="", flush=True)
        sink = _OrderedSink(self.tokenizer, self.as_json or self.streaming, output_file
                            if printing else None, printing)
        counts = {"tokens": 0, "done": 0}
        clock = time.perf_counter()
        with progress.request_progress(len(self.ids), enabled=not quiet and printing
                                       and not self.streaming) as update:
            def on_output(out):
                counts["tokens"] += 1
                if stream is not None:
                    stream(out.token_ids[-1])
                if out.finished:
                    counts["done"] += 1
                update(counts["done"], counts["tokens"])

            try:
                completions = model.run(self.ids, self.requests, on_output=on_output,
                                        on_completion=sink.add,
                                        stop_token_ids=self.stop_token_ids)
            except BaseException:
                sink.discard()
                raise
        seconds = time.perf_counter() - clock
        if stream is not None:
            print(stream.detokenizer.flush(), end="", flush=True)
        sink.close()
        if printing:
            _print_result(completions, self.tokenizer, self.as_json, streamed=self.streaming)
            _status(sum(len(c.token_ids) for c in completions), len(completions), seconds,
                    model.engine().stats() if model._engine is not None else None, quiet)


class _OrderedSink:
    """Completions in input order as they finish: each is printed (unless `held`, for
    --json and streamed runs, which print at the end) and written to the --output JSONL
    once every earlier one is done. The file is written under a temporary name and renamed
    at the end: a reader never sees half a file."""

    def __init__(self, tokenizer, held: bool, output_file, printing: bool):
        self.tokenizer, self.held, self.printing = tokenizer, held, printing
        self.pending: dict[int, object] = {}
        self.next = 0
        self.path = pathlib.Path(output_file) if output_file else None
        self.file = None
        if self.path is not None:
            self.temp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
            self.file = open(self.temp, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def add(self, index: int, completion) -> None:
        self.pending[index] = completion
        while self.next in self.pending:
            done = self.pending.pop(self.next)
            if self.file is not None:
                self.file.write(json.dumps(_completion_json(done)) + "\n")
            if self.printing and not self.held:
                print(_text_of(done, self.tokenizer), flush=True)
            self.next += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            os.replace(self.temp, self.path)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.temp.unlink(missing_ok=True)


class _Printer:
    """Prints a streamed prompt's text piece by piece, each once final."""

    def __init__(self, detokenizer):
        self.detokenizer = detokenizer

    def __call__(self, token: int) -> None:
        if piece := self.detokenizer.push(token):
            print(piece, end="", flush=True)


def _completion_json(completion) -> dict:
    return {"prompt_token_ids": completion.prompt_token_ids, "token_ids": completion.token_ids,
            "text": completion.text, "finish_reason": completion.finish_reason}


def _text_of(completion, tokenizer) -> str:
    """The prompt's text and the continuation (as `Completion.text` gives it: the rule of
    every output path, `runtime.detokenize`); token ids without a tokenizer."""
    if tokenizer is None:
        return " ".join(map(str, completion.prompt_token_ids + completion.token_ids))
    return tokenizer.decode(completion.prompt_token_ids) + completion.text


def _print_result(completions, tokenizer, as_json: bool, streamed: bool) -> None:
    """--json (one object for every prompt), or the end of a streamed run (texts of other
    runs were printed as they completed)."""
    if as_json:
        payload = {"tokens": [c.prompt_token_ids + c.token_ids for c in completions],
                   "finish_reason": [c.finish_reason for c in completions]}
        if tokenizer is not None:
            payload["text"] = [_text_of(c, tokenizer) for c in completions]
        print(json.dumps(payload))
    elif streamed:
        print()


def _compile_status(compiled: dict, traced: int, quiet: bool) -> None:
    """How many step programs compiled at start-up (beside the restore), and how many the
    run still had to compile (requests that stopped early can reach other buckets)."""
    later = max(0, traced - compiled["programs"])
    progress.say(f"engine: {compiled['programs']} step program(s) compiled at start-up in "
                 f"{compiled['seconds']:.1f} s (beside the restore), {later} during the run",
                 quiet)


def _status(tokens: int, prompts: int, seconds: float, stats: dict | None,
            quiet: bool) -> None:
    """Tokens, time and speed of the run, and the engine's counters, on stderr."""
    speed = f"{tokens / seconds:.1f} tok/s" if seconds > 0 else "n/a"
    line = f"generated {tokens} token(s) for {prompts} prompt(s) in {seconds:.2f} s: {speed}"
    if stats is not None:
        line += (f" ({stats['steps']} steps, KV pages peak {stats['peak_pages_used']} of "
                 f"{stats['num_pages'] - 1}, {stats['preemptions']} preemption(s), "
                 f"{stats['prefix_hit_pages']} prefix-cache hit page(s))")
    progress.say(line, quiet)


def read_records(path: pathlib.Path) -> list[dict]:
    """--input: one prompt per line (plain text), or JSON Lines (the first line starts with
    "{") of objects with "prompt" or "prompt_ids" and optional per-request settings. Every
    line is read and parsed before anything runs; an empty or malformed line is a one-line
    InputError naming it."""
    lines = read_lines(path, "--input")
    jsonl = lines[0].lstrip().startswith("{")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"--input {path}: line {number} is empty; expected "
                             + ("a JSON object" if jsonl else "a prompt"))
        if not jsonl:
            records.append({"prompt": line})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"--input {path}: line {number} is not valid JSON ({err.msg})"
                             ) from None
        try:
            _check_record(record)
        except UsageError as err:
            raise InputError(f"--input {path}: line {number}: {err}") from None
        records.append(record)
    return records


def read_prompts(path: pathlib.Path) -> list[str]:
    """--input's text prompts (`read_records`, for a file of text prompts only)."""
    return [record["prompt"] for record in read_records(path)]


def _check_record(record) -> None:
    """UsageError unless `record` is an --input object the engine's front end accepts
    (`jaxaccel.engine.frontend.request_from_record`'s rules: fields, types, ranges)."""
    # deferred: the engine package imports jax; --help stays light
    from jaxaccel.engine.frontend import request_from_record
    from jaxaccel.engine.requests import SamplingParams

    try:
        request_from_record(record, 0, SamplingParams(), lambda text: [0])
    except InputError as err:
        raise UsageError(str(err).removeprefix("line 0: ")) from None


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    """Write JSON Lines atomically: a reader never sees half a file."""
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))
