"""`Model`: a restored checkpoint ready to embed, generate or classify, as `jaxaccel.load`
returns it.

Completions follow the conventions users know from vLLM and transformers: `generate` stops
at the checkpoint's end-of-sequence token(s) by default, `token_ids` are the new tokens only
(the EOS token included when reached), `finish_reason` is "eos", "stop" or "length".
"""

from __future__ import annotations

import dataclasses
import html
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from jaxaccel import models
from jaxaccel.engine.engine import LLMEngine
from jaxaccel.engine.frontend import engine_for, run_requests
from jaxaccel.engine.requests import Request, RequestOutput, SamplingParams
from jaxaccel.runtime import requests
from jaxaccel.runtime.classify import Classification, Classifier
from jaxaccel.runtime.detokenize import IncrementalDetokenizer, continuation_text
from jaxaccel.runtime.embed import Embedder
from jaxaccel.errors import InputError, UsageError
from jaxaccel.runtime.generate import Generator
from jaxaccel.runtime.loaded import LoadedModel
from jaxaccel.parallel.params import flat_arrays
from jaxaccel.runtime.sampling import Sampling
from jaxaccel.parallel.sharding import format_mesh
from jaxaccel.inputs import prompts
from jaxaccel.inputs.tokenizer import TextTokenizer
from jaxaccel.utils.arguments import at_least, checked
from jaxaccel.utils.units import format_bytes

_SHOWN_ARRAYS = 6


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # the new tokens' text after the prompt's (special tokens skipped), cut
    # before a stop string: decode(prompt + new) past decode(prompt) (runtime.detokenize)
    token_ids: list[int]  # new tokens only
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"


class Model:
    """A restored model on its mesh. `embed` for encoders, `generate`/`stream` for decoders,
    `classify` for image classifiers."""

    def __init__(self, loaded: LoadedModel, *, microbatches: int | None = None,
                 runner: Embedder | Generator | Classifier | None = None):
        """`runner`: one already compiled for this model with its weights attached (what
        `jaxaccel.startup.start.start` returns); the first call whose shapes it covers runs
        at once."""
        self.loaded = loaded
        self.task = models.task(loaded.family)
        self._microbatches = microbatches
        self._tokenizer = TextTokenizer(loaded.tokenizer_path) if loaded.tokenizer_path else None
        self._embedders: dict = {}
        self._classifiers: dict = {}
        self._generator = runner if isinstance(runner, Generator) else None
        self._engine: LLMEngine | None = None
        self._engine_args: dict = {}
        self._engine_lock = threading.Lock()  # one run at a time on the engine
        if isinstance(runner, Embedder):  # keyed as `_embedder` keys its shape policies
            max_length = None if runner.max_length == self._default_length() else runner.max_length
            self._embedders[(runner.batch_size, max_length)] = runner
        elif isinstance(runner, Classifier):
            self._classifiers[runner.batch_size] = runner

    # Facts ----------------------------------------------------------------------------------

    family = property(lambda self: self.loaded.family, doc="Model family, as registered in `jaxaccel.models`.")
    config = property(lambda self: self.loaded.config, doc="The family's Config dataclass.")
    mesh = property(lambda self: self.loaded.layout.mesh, doc="The jax.sharding.Mesh.")
    dtype = property(lambda self: self.loaded.dtype, doc="Compute dtype name.")
    quantization = property(lambda self: self.loaded.quantization.get("scheme"),
                            doc="Weight-only quantization scheme ('int8', 'int4', 'fp8') or None.")

    @property
    def nbytes(self) -> int:
        """Bytes of all parameters (global, not per device)."""
        return sum(int(x.nbytes) for x in flat_arrays(self.loaded.state).values())

    def shardings(self) -> dict[str, str]:
        """Parameter name -> its PartitionSpec, e.g. {'blocks.wq_dnh': "P(None, None, 'model')"}."""
        return {name: str(x.sharding.spec) for name, x in flat_arrays(self.loaded.state).items()}

    def __repr__(self) -> str:
        quant = f"{self.quantization} weights, " if self.quantization else ""
        lines = [f"Model({self.family}, {self.task}, {self.dtype}, {quant}"
                 f"{format_bytes(self.nbytes)}, mesh {format_mesh(dict(self.mesh.shape))})"]
        lines += [f"  {axis}: {count} parameter(s) split" for axis, count in
                  self._split_counts().items()]
        lines.append(f"  from {self.loaded.path}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in self._summary().items())
        return f"<table><caption>jaxaccel Model</caption>{rows}</table>"

    def _summary(self) -> dict:
        shard = self.shardings()
        shown = dict(list(shard.items())[:_SHOWN_ARRAYS])
        return {"family": self.family, "task": self.task, "dtype": self.dtype,
                "quantization": self.quantization or "none",
                "parameters": format_bytes(self.nbytes),
                "mesh": format_mesh(dict(self.mesh.shape)),
                "split over": ", ".join(f"{a}: {n}" for a, n in self._split_counts().items())
                or "nothing (replicated)",
                **{f"sharding {k}": v for k, v in shown.items()},
                "path": str(self.loaded.path)}

    def _split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for x in flat_arrays(self.loaded.state).values():
            for axis in {a for part in x.sharding.spec if part for a in
                         ((part,) if isinstance(part, str) else part)}:
                counts[axis] = counts.get(axis, 0) + 1
        return counts

    # Embedding ------------------------------------------------------------------------------

    @checked
    def embed(self, texts: str | Sequence[str], *, batch_size: int | None = None,
              max_length: int | None = None, prompt_name: str | None = None) -> np.ndarray:
        """Sentence embeddings, float32 [n, dim], in input order (one text: [1, dim]).

        Inputs longer than `max_length` tokens (default: the model's own limit) are truncated
        with a warning, as sentence-transformers does. Each text gets the model's prompt
        (`prompt_name`, default its `default_prompt_name`; see `jaxaccel.inputs.prompts`).
        Raises UsageError for a decoder or a prompt name the model lacks.
        """
        self._require("embed")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("embed takes a string or a non-empty sequence of strings")
        texts = prompts.apply(prompts.settings_of(self.loaded.manifest), texts, prompt_name)
        at_least(batch_size, 1, "batch_size")
        at_least(max_length, 2, "max_length")  # [CLS] and [SEP] at least
        embedder = self._embedder(batch_size or 32, max_length)
        vectors, truncated = embedder.embed_texts(texts)
        if truncated:
            warnings.warn(f"{len(truncated)} input(s) truncated to {embedder.max_length} tokens "
                          f"(first: input {truncated[0]})", stacklevel=2)
        return vectors

    def _embedder(self, batch_size: int, max_length: int | None) -> Embedder:
        key = (batch_size, max_length)
        if key not in self._embedders:  # one per shape policy: its programs are cached inside
            self._embedders[key] = Embedder(self.loaded, batch_size=batch_size,
                                            max_length=max_length, microbatches=self._microbatches)
        return self._embedders[key]

    # Classification -------------------------------------------------------------------------

    @checked
    def classify(self, images, *, batch_size: int | None = None,
                 skip_bad: bool = False) -> Classification:
        """Classify images: paths, PIL images, or uint8 arrays [h, w, 3] / [n, h, w, 3].

        Returns a `Classification` (float32 `logits` [n, labels] in input order, `top_k(k)`
        with the checkpoint's labels). Raises UsageError for a text model.
        """
        self._require("classify")
        at_least(batch_size, 1, "batch_size")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, (str, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        key = batch_size or 32
        if key not in self._classifiers:  # its program cache lives inside
            self._classifiers[key] = Classifier(self.loaded, batch_size=key)
        return self._classifiers[key].classify(list(images), skip_bad=skip_bad)

    # Generation -----------------------------------------------------------------------------

    @checked
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
                 max_new_tokens: int | Sequence[int], greedy: bool | None = None,
                 temperature: float | Sequence[float] | None = None,
                 top_k: int | Sequence[int] | None = None,
                 top_p: float | Sequence[float] | None = None,
                 seed: int | Sequence[int] | None = None,
                 stop: str | Sequence[str] | None = None,
                 ignore_eos: bool = False) -> list[Completion]:
        """One Completion per prompt (text, or token ids), in prompt order. Stops at the
        checkpoint's EOS token(s) unless `ignore_eos`, and at the first of the `stop` strings
        (cut before it).

        Any number of prompts: they run through the generation engine (continuous batching
        over a paged KV cache, `jaxaccel.engine`), each with its own settings:
        `max_new_tokens`, `temperature`, `top_k`, `top_p` and `seed` may each be one value
        for every prompt or a list with one entry per prompt. A single `seed` s gives prompt
        i the seed s + i (a request's tokens depend on its own seed only, not on the prompts
        batched with it). `greedy=None` follows the checkpoint's generation_config.json as
        transformers does (sampling with its temperature/top_k/top_p when it says
        `do_sample`, else greedy), unless a temperature is given; `greedy=True` forces
        argmax. top_k/top_p need a temperature > 0 (given or the checkpoint's): without one
        they are refused, not ignored. The same rules as `jaxaccel generate`
        (`jaxaccel.runtime.requests`). Raises UsageError for bad prompts or settings
        (max_new_tokens < 1 included, a list of the wrong length), before any compute.
        """
        ids = self._prompt_ids(prompts)
        per_prompt = _per_prompt(len(ids), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        checked_ = [requests.request(settings.pop("max_new_tokens"), greedy=greedy,
                                     stop=stop, ignore_eos=ignore_eos,
                                     defaults=self.loaded.manifest.generation, **settings)
                    for settings in per_prompt]
        if not isinstance(seed, (list, tuple, np.ndarray)):  # one seed for the call: s + i for prompt i
            checked_ = [dataclasses.replace(r, sampling=dataclasses.replace(
                r.sampling, seed=(r.sampling.seed + i) % 2**32)) for i, r in enumerate(checked_)]
        return self.run(ids, checked_)

    def complete(self, prompt_ids: list[list[int]], max_new_tokens: int,
                 sampling: Sampling, *, ignore_eos: bool = False, stop: Sequence[str] = (),
                 on_step=None) -> list[Completion]:
        """`generate` for token-id prompts and one `Sampling` (`runtime.requests` makes one)
        shared by every prompt (prompt i seeded with sampling.seed + i). `on_step(tokens)`:
        called with one entry per prompt (its new token, or None) whenever tokens arrive."""
        request = requests.Request(requests.check_max_new_tokens(max_new_tokens), sampling,
                                   requests.check_stop(stop), bool(ignore_eos))
        per = [dataclasses.replace(request, sampling=dataclasses.replace(
            sampling, seed=(sampling.seed + i) % 2**32)) for i in range(len(prompt_ids))]
        on_output = None
        if on_step is not None:
            def on_output(out):
                tokens = [None] * len(prompt_ids)
                tokens[out.request_id] = out.token_ids[-1]
                on_step(tokens)
        return self.run(prompt_ids, per, on_output=on_output)

    def run(self, prompt_ids: Sequence[Sequence[int]], checked: Sequence[requests.Request],
            on_output=None, on_completion=None,
            stop_token_ids: Sequence[Sequence[int]] | None = None) -> list[Completion]:
        """Run prompts (token ids) with one checked `runtime.requests.Request` each through
        the engine; Completions in prompt order. `on_output(RequestOutput)` sees every new
        token (request_id = the prompt's index); `on_completion(index, Completion)` each
        prompt as it finishes; `stop_token_ids`: per prompt, ids that end it (kept in the
        output, finish_reason "stop"). A pipeline-parallel (`stage`) layout decodes in one static
        batch instead (the engine does not run stage meshes yet). UsageError before any
        compute for a prompt the model cannot run."""
        for ids, request in zip(prompt_ids, checked):
            requests.check_prompts(self.config, [ids], request.max_new_tokens)
        if self._decoder().runtime.pipeline is not None:
            return self._run_static(prompt_ids, checked, on_output, on_completion)
        stop_ids = stop_token_ids or [()] * len(prompt_ids)
        engine_requests = [Request(i, tuple(ids), _engine_params(r, stops))
                           for i, (ids, r, stops) in enumerate(zip(prompt_ids, checked,
                                                                   stop_ids))]

        def finished(out):
            if on_output is not None:
                on_output(out)
            if out.finished and on_completion is not None:
                on_completion(out.request_id, self._engine_completion(out, checked))

        with self._engine_lock:
            engine = self.engine()
            try:
                outputs = run_requests(None, engine_requests, engine=engine, on_output=finished)
            except BaseException:
                self._engine = None  # requests may be left in it: the next call starts afresh
                raise
        return [self._engine_completion(out, checked) for out in outputs]

    def _engine_completion(self, out, checked) -> Completion:
        """A finished RequestOutput as a Completion: its text by the rule of every output
        path (`_completion`), the engine's finish reason unless a stop string cut it."""
        i = out.request_id
        eos = [] if checked[i].ignore_eos else self.eos_token_ids
        done = self._completion(list(out.prompt_token_ids), out.token_ids, eos,
                                checked[i].stop)
        if done.finish_reason == "stop" or out.finish_reason is None:
            return done
        return dataclasses.replace(done, finish_reason=out.finish_reason)

    def engine(self, **engine_args) -> LLMEngine:
        """The generation engine on this model (built on first use and kept; `engine_args`
        such as max_num_seqs, max_num_batched_tokens, kv_cache_bytes, enable_prefix_caching
        and page_size rebuild it: see `jaxaccel.engine.LLMEngine`). Its compiled step
        programs are cached on the model's runtime."""
        if self._engine is None or (engine_args and engine_args != self._engine_args):
            self._engine_args = engine_args or self._engine_args
            self._engine = None  # the old pool's memory goes before the new one is made
            detokenize = self._tokenizer.decode if self._tokenizer is not None else None
            self._engine = engine_for(self._decoder(), eos_token_ids=self.eos_token_ids,
                                      detokenize=detokenize, **self._engine_args)
        return self._engine

    def _run_static(self, prompt_ids, checked, on_output, on_completion) -> list[Completion]:
        """A `stage` layout: one left-padded batch per distinct setting (the static path);
        `on_output` sees each prompt's tokens once its batch is done."""
        out: dict[int, Completion] = {}
        groups: dict = {}
        for i, r in enumerate(checked):
            groups.setdefault((r.sampling, r.ignore_eos), []).append(i)
        for (sampling, ignore_eos), rows in groups.items():
            longest = max(checked[i].max_new_tokens for i in rows)
            eos = [] if ignore_eos else self.eos_token_ids
            new = self._decoder().generate([prompt_ids[i] for i in rows], longest,
                                           sampling=sampling, eos_id=eos or None)
            for i, tokens in zip(rows, new):
                out[i] = self._completion(prompt_ids[i], tokens[:checked[i].max_new_tokens],
                                          eos, checked[i].stop)
                for n in range(1, len(out[i].token_ids) + 1) if on_output else ():
                    on_output(RequestOutput(i, tuple(prompt_ids[i]), out[i].token_ids[:n],
                                            finished=n == len(out[i].token_ids)))
                if on_completion is not None:
                    on_completion(i, out[i])
        return [out[i] for i in range(len(prompt_ids))]

    @property
    def eos_token_ids(self) -> list[int]:
        """Every end-of-sequence id the checkpoint declares (config.json and
        generation_config.json, recorded at convert; older checkpoints: the config's one id)."""
        ids = self.loaded.manifest.generation.get("eos_token_ids")
        if ids is None:
            ids = [] if self.config.eos_token_id is None else [self.config.eos_token_id]
        return [int(i) for i in ids]

    @property
    def tokenizer(self) -> TextTokenizer | None:
        """The checkpoint's tokenizer (None if it ships none)."""
        return self._tokenizer

    @checked
    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int,
               **settings) -> Iterator[str]:
        """Yield the text of one prompt's continuation as it is generated (pieces joined
        give `generate(prompt, ...)[0].text` without stop strings)."""
        ids = self._prompt_ids([prompt] if isinstance(prompt, str) else [list(prompt)])
        if self._tokenizer is None:
            raise UsageError(f"{self.loaded.path}: stream needs the checkpoint's tokenizer.json")
        unknown = set(settings) - {"greedy", "temperature", "top_k", "top_p", "seed",
                                   "ignore_eos"}
        if unknown:
            raise UsageError(f"stream: unknown settings {sorted(unknown)}")
        request = requests.request(max_new_tokens, defaults=self.loaded.manifest.generation,
                                   **settings)
        requests.check_prompts(self.config, ids, request.max_new_tokens)
        yield from self._stream_text(ids[0], request, None)

    def _stream_text(self, prompt: list[int], request, eos) -> Iterator[str]:
        """Generate on a thread (through the engine); yield the text of each new token as it
        arrives, in the context of the prompt (`runtime.detokenize`, the rule of every
        output path)."""
        tokens: queue.Queue = queue.Queue()
        errors: list[BaseException] = []

        def run():
            try:
                self.run([prompt], [request],
                         on_output=lambda out: tokens.put(out.token_ids[-1]))
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(err)
            tokens.put(StopIteration)

        threading.Thread(target=run, name="jaxaccel-stream", daemon=True).start()
        detokenizer = IncrementalDetokenizer(self._tokenizer, prompt)
        while (token := tokens.get()) is not StopIteration:
            if token is not None and (piece := detokenizer.push(token)):
                yield piece
        if errors:
            raise errors[0]
        if piece := detokenizer.flush():
            yield piece

    def _decoder(self) -> Generator:
        self._require("generate")
        if self._generator is None:
            loaded = self.loaded
            self._generator = Generator(loaded.graphdef, loaded.state, loaded.config,
                                        loaded.layout, microbatches=self._microbatches)
        return self._generator

    def _prompt_ids(self, prompts) -> list[list[int]]:
        self._require("generate")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(p, str) for p in prompts):
            if self._tokenizer is None:
                raise UsageError(f"{self.loaded.path} has no tokenizer.json: give token ids")
            return [self._tokenizer.encode_one(p) for p in prompts]
        if not prompts or not all(_is_id_list(p) for p in prompts):
            raise UsageError("prompts must be a string, a sequence of strings, or a sequence "
                             "of token-id sequences")
        ids = [[int(t) for t in p] for p in prompts]
        requests.check_prompts(self.config, ids, 1)
        return ids

    def _completion(self, prompt, new, eos, stops) -> Completion:
        """Generation stops at a stop string as vLLM does: the text is cut before it; the
        token ids run to the token that completed it."""
        text = continuation_text(self._tokenizer, prompt, new) if self._tokenizer else ""
        reason = "eos" if new and new[-1] in eos else "length"
        found = [s for s in stops if s and s in text]
        if found:
            first = min(found, key=text.find)
            text, reason = text[:text.find(first)], "stop"
            new = _tokens_until(self._tokenizer, prompt, new, first)
        return Completion(text, list(new), list(prompt), reason)

    def _default_length(self) -> int:
        return min(self.config.default_length, self.config.max_length)

    def _require(self, task: str) -> None:
        if self.task != task:
            raise UsageError(f"{self.loaded.path} holds a {self.family!r} model ({self.task}); "
                             f"{task} needs one of {', '.join(models.families_for(task))}")


def _per_prompt(n: int, **settings) -> list[dict]:
    """One dict of settings per prompt: a list (or tuple) value gives each prompt its own
    entry; any other value is shared. UsageError for a list of the wrong length."""
    rows = [{} for _ in range(n)]
    for name, value in settings.items():
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) != n:
                raise UsageError(f"{name}: {len(value)} values for {n} prompt(s); give one "
                                 f"value, or one per prompt")
            for row, v in zip(rows, value):
                row[name] = v.item() if isinstance(v, np.generic) else v
        else:
            for row in rows:
                row[name] = value
    return rows


def _engine_params(request: requests.Request, stop_token_ids=()) -> SamplingParams:
    """The engine's per-request settings of a checked request."""
    s = request.sampling
    return SamplingParams(max_tokens=request.max_new_tokens, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, seed=s.seed % 2**32,
                          stop=request.stop, stop_token_ids=tuple(stop_token_ids),
                          ignore_eos=request.ignore_eos)


def _is_id_list(p) -> bool:
    return not isinstance(p, str | bytes) and isinstance(p, Sequence) and len(p) > 0 and all(
        isinstance(t, int | np.integer) and not isinstance(t, bool) for t in p)


def _tokens_until(tokenizer, prompt: list[int], new: list[int], stop: str) -> list[int]:
    """The shortest prefix of `new` whose text (after the prompt's) contains `stop`."""
    for n in range(1, len(new) + 1):
        if stop in continuation_text(tokenizer, prompt, new[:n]):
            return new[:n]
    return new
