"""Structured output: a request's constraint (a JSON schema, any JSON object, a regex, a choice among
strings, an EBNF grammar), compiled by xgrammar into a token-level grammar over this model's vocabulary.

Each constrained sequence has a `GrammarState`: a matcher that advances with every accepted token and fills
its row of the step's token bitmask; the sampler applies the bitmask of every constrained row of the batch at
once (sampler.py), so constrained and free requests share the same steps. When the grammar is complete the
mask allows only the end-of-sequence token; accepting it terminates the matcher and ends the request.

Compilation runs in this module's own threads (never on the event loop, the engine thread or the request
threads that tokenize: the AsyncEngine awaits it before validating the request), is cached per constraint
(this model's tokenizer is fixed; identical concurrent requests share one compilation), and is bounded in
time: a constraint not compiled within `timeout_s` is refused with a clear error (its compilation finishes in
the background and lands in the cache). Invalid schemas, regexes and grammars are
refused naming the field, before the request is queued.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
import dataclasses
from dataclasses import dataclass

import torch

from server.errors import InvalidRequestError

log = logging.getLogger("tessera.engine")

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar longer than this is refused before compiling
# counted repetitions ({m,n}) compile in time growing with n, much faster inside JSON strings: bounded up front
MAX_REPEAT = 1000
_REPEAT = re.compile(r"(?<!\\)\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] [^\s:]+:\d+: ")  # "[14:50:09] /project/cpp/x.cc:94: " in xgrammar errors


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one constraint. json_schema is the schema's JSON text."""

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    # how the request named it, for errors ("structured_output" = the gRPC field; the HTTP API gives its own)
    field: str = dataclasses.field(default="structured_output", compare=False)

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [k for k in KINDS if (getattr(self, k) not in (None, False))]
        if len(set_) != 1:
            raise InvalidRequestError(f"{self.field}: set exactly one of {', '.join(KINDS)}"
                                      + (f" (got {', '.join(set_)})" if set_ else ""), self.field)
        kind = set_[0]
        spec, name = getattr(self, kind), self.name
        if isinstance(spec, str) and not spec.strip():
            raise InvalidRequestError(f"{name} is empty", name)
        if isinstance(spec, str) and len(spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(f"{name} has {len(spec)} characters; at most {MAX_SPEC_CHARS}", name)
        if kind == "choice":
            if not spec or any(not isinstance(c, str) or c == "" for c in spec):
                raise InvalidRequestError(f"{name} needs one or more non-empty strings", name)
        if kind == "json_schema":
            try:
                schema = json.loads(spec)
            except ValueError as exc:
                raise InvalidRequestError(f"{name} is not valid JSON: {exc}", name) from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(f"{name} must be a JSON object (a JSON Schema)", name)
            for pattern in _patterns(schema):
                _check_repeats(pattern, f"{name} pattern", name)
        if kind == "regex":
            _check_repeats(spec, name, name)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def name(self) -> str:
        """The field to name in errors: structured_output.<kind> over gRPC, the HTTP API's own field there."""
        return f"{self.field}.{self.kind}" if self.field == "structured_output" else self.field

    @property
    def key(self) -> tuple:
        return (self.kind, getattr(self, self.kind))


def _patterns(schema):
    """Every regular expression in a JSON schema ("pattern" values, "patternProperties" keys)."""
    if isinstance(schema, dict):
        for k, v in schema.items():
            if k == "pattern" and isinstance(v, str):
                yield v
            elif k == "patternProperties" and isinstance(v, dict):
                yield from (x for x in v if isinstance(x, str))
                yield from _patterns(v)
            else:
                yield from _patterns(v)
    elif isinstance(schema, list):
        for v in schema:
            yield from _patterns(v)


def _check_repeats(regex: str, what: str, param: str) -> None:
    total = 1
    for lo, hi in _REPEAT.findall(regex):
        bound = max(int(lo or 0), int(hi or 0)) if (lo or hi) else 0
        if bound > MAX_REPEAT:
            raise InvalidRequestError(f"{what}: a repetition bound of {bound} is over {MAX_REPEAT}", param)
        total *= max(1, bound)
        if total > 100 * MAX_REPEAT:
            raise InvalidRequestError(f"{what}: its repetition bounds multiply to over {100 * MAX_REPEAT}", param)


def _choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose sentences are exactly the choices (string literals with JSON escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """One per engine: compiles constraints for its tokenizer, caches them, builds per-sequence matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], timeout_s: float = 10.0,
                 cache_size: int = 256, threads: int = 2):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tessera-grammar")
        self.num_compiled = 0  # compilations started (cache misses)
        self.num_cache_hits = 0

    def _xgr(self):
        """The xgrammar compiler for this tokenizer, made on first use (a failure here is the server's)."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
            return self._compiler

    def prepare(self) -> None:
        """Build the tokenizer's grammar tables now (at start-up, before SERVING) instead of at the first request."""
        self._xgr()

    def submit(self, so: StructuredOutput) -> Future:
        """The constraint's compilation, started now or shared with earlier requests (cached): any thread, cheap.
        Its result is xgrammar's CompiledGrammar, or InvalidRequestError naming the field."""
        with self._lock:
            fut = self._cache.get(so.key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(so.key)
                self.num_cache_hits += 1
                return fut
            fut = self._executor.submit(self._compile, so)
            self._cache[so.key] = fut
            self.num_compiled += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return fut

    def compile(self, so: StructuredOutput, timeout_s: float | None = None):
        """-> xgrammar's CompiledGrammar. Raises InvalidRequestError naming the field for a bad constraint or
        one not compiled within timeout_s (default self.timeout_s)."""
        fut = self.submit(so)
        try:
            return fut.result(timeout=self.timeout_s if timeout_s is None else timeout_s)
        except FutureTimeout:
            raise self.timeout_error(so) from None

    def timeout_error(self, so: StructuredOutput) -> InvalidRequestError:
        return InvalidRequestError(f"{so.name}: not compiled within {self.timeout_s:g} s; simplify the constraint",
                                   so.name)

    def _compile(self, so: StructuredOutput):
        compiler = self._xgr()  # a failure to build it is the server's (not caught below)
        kind = so.kind
        try:
            if kind == "json_schema":
                return compiler.compile_json_schema(so.json_schema, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return compiler.compile_regex(so.regex)
            if kind == "choice":
                return compiler.compile_grammar(_choice_grammar(so.choice))
            return compiler.compile_grammar(so.grammar)
        except Exception as exc:  # xgrammar's message says what is wrong with the constraint
            msg = _XGR_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise InvalidRequestError(f"{so.name}: {msg}", so.name) from None

    def state(self, so: StructuredOutput, timeout_s: float | None = None) -> "GrammarState":
        return GrammarState(self.compile(so, timeout_s), self.vocab_size)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask row `row`."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def apply_masks(logits: torch.Tensor, states: list[GrammarState | None]) -> dict[int, str]:
    """Mask every constrained row of logits [B, V] in place (one bitmask for the batch) -> row -> error for rows
    whose matcher failed or that allow no token."""
    import xgrammar as xgr

    rows = [i for i, s in enumerate(states) if s is not None]
    errors: dict[int, str] = {}
    if not rows:
        return errors
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i in rows:
        try:
            states[i].fill(bitmask, i)
        except Exception as exc:  # this row's matcher only
            log.exception("structured output: filling the mask of row %d failed", i)
            errors[i] = f"internal error in the output constraint: {type(exc).__name__}: {exc}"
    ok = [i for i in rows if i not in errors]
    if ok:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=ok)
        dead = (~torch.isfinite(logits[ok]).any(dim=-1)).nonzero().flatten().tolist()
        for j in dead:
            errors[ok[j]] = "the output constraint allows no token here"
    return errors
