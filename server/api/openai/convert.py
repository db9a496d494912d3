"""OpenAI request bodies -> engine requests, engine outputs -> OpenAI choices and chunks.

One body becomes one engine request per choice: `n` choices for each prompt (a completions request may
carry several prompts), choice i of prompt p at index p * n + i. Choices after the first of a seeded
request get seed + i, so they differ but stay reproducible.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc

from server.api.openai.errors import ApiError
from server.api.openai.protocol import MAX_STOP, ChatCompletionRequest, CompletionRequest, _Sampling
from server.engine.request import FinishReason, GenerateRequest, RequestOutput, SamplingParams
from server.engine.structured import StructuredOutput

_FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
           FinishReason.CANCELLED: "abort"}


def _bad(message: str, param: str | None) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, param)


def _refuse_unsupported(body: _Sampling) -> None:
    if body.logit_bias:
        raise _bad("logit_bias is not supported by this server", "logit_bias")
    if body.best_of not in (None, 1):
        raise _bad("best_of > 1 is not supported by this server (use n)", "best_of")
    if body.stream_options is not None and not body.stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")


def _stops(body: _Sampling) -> tuple[str, ...]:
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOP:
        raise _bad(f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise _bad("stop strings must be non-empty", "stop")
    return stops


def structured(body: _Sampling) -> StructuredOutput | None:
    """response_format, vLLM's structured_outputs or its older guided_* fields -> one constraint (or None)."""
    given: list[tuple[str, dict]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise _bad("response_format json_schema needs json_schema.schema", "response_format.json_schema")
        given.append(("response_format.json_schema.schema", {"json_schema": json.dumps(rf.json_schema.schema_)}))
    so = body.structured_outputs
    if so is not None:
        for field_name, key in (("json_", "json_schema"), ("json_object", "json_object"), ("regex", "regex"),
                                ("choice", "choice"), ("grammar", "grammar")):
            v = getattr(so, field_name)
            if v is None or v is False:
                continue
            if key == "json_schema" and not isinstance(v, str):
                v = json.dumps(v)
            given.append((f"structured_outputs.{field_name.rstrip('_')}", {key: v}))
    for name, key in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        v = getattr(body, name)
        if v is not None:
            given.append((name, {key: v if isinstance(v, (str, list)) else json.dumps(v)}))
    if not given:
        return None
    if len(given) > 1:
        raise _bad(f"give one output constraint, got {', '.join(n for n, _ in given)}", given[1][0])
    name, kw = given[0]
    try:
        return StructuredOutput(**kw, field=name)
    except ValueError as exc:
        raise _bad(str(exc), name) from None


def _sampling(body: _Sampling, max_tokens: int | None, default_max: int, logprobs: bool, top: int,
              choice: int) -> SamplingParams:
    max_new = max_tokens or default_max
    if body.min_tokens > max_new:
        raise _bad(f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_new})", "min_tokens")
    if any(t < 0 for t in body.stop_token_ids or ()):
        raise _bad("stop_token_ids must be >= 0", "stop_token_ids")
    seed = None if body.seed is None else (body.seed + choice) % 2**64
    try:
        return SamplingParams(
            max_new_tokens=max_new, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=max(0, body.top_k or 0), top_p=1.0 if body.top_p is None else body.top_p,
            repetition_penalty=body.repetition_penalty or 1.0, seed=seed, stop=_stops(body),
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
            top_logprobs=top, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            min_tokens=body.min_tokens)
    except ValueError as exc:
        raise _bad(str(exc), None) from None


@dataclass
class Plan:
    """The engine requests of one body, in choice order."""
    requests: list[GenerateRequest]
    prompt_index: list[int]  # choice -> which prompt
    echo: list[str | None] = field(default_factory=list)  # completions with echo: the prompt text per choice

    @property
    def num_prompts(self) -> int:
        return max(self.prompt_index) + 1


def completion_plan(body: CompletionRequest, adapter_id: str | None, default_max: int, decode) -> Plan:
    _refuse_unsupported(body)
    if body.suffix:
        raise _bad("suffix is not supported by this server", "suffix")
    if body.echo and body.logprobs is not None:
        raise _bad("echo with logprobs (prompt log-probabilities) is not supported", "echo")
    p = body.prompt
    if isinstance(p, str):
        prompts: list = [p]
    elif not p:
        raise _bad("prompt is empty", "prompt")
    elif all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if len(prompts) * body.n > 16:
        raise _bad(f"{len(prompts)} prompts x n={body.n} is over 16 choices", "n")
    logprobs = body.logprobs is not None
    constraint = structured(body)
    plan = Plan([], [])
    for pi, prompt in enumerate(prompts):
        if isinstance(prompt, (str, list)) and len(prompt) == 0:
            raise _bad(f"prompt[{pi}] is empty" if len(prompts) > 1 else "prompt is empty", "prompt")
        if isinstance(prompt, list) and any(t < 0 for t in prompt):
            raise _bad("prompt token ids must be >= 0", "prompt")
        for i in range(body.n):
            kw = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
            plan.requests.append(GenerateRequest(
                **kw, adapter_id=adapter_id, structured=constraint,
                sampling=_sampling(body, body.max_tokens, default_max, logprobs, body.logprobs or 0, i)))
            plan.prompt_index.append(pi)
            if body.echo:
                plan.echo.append(prompt if isinstance(prompt, str) else decode(prompt))
    return plan


def _content(m, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise _bad(f"messages[{i}].content[{j}]: only text parts are supported (got type {part.type!r})",
                       f"messages[{i}].content[{j}]")
        texts.append(part.text)
    return "\n".join(texts)


def chat_plan(body: ChatCompletionRequest, adapter_id: str | None, default_max: int) -> Plan:
    _refuse_unsupported(body)
    if body.tools:
        raise _bad("tools (function calling) are not supported by this server", "tools")
    if body.top_logprobs and not body.logprobs:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    messages = [{"role": m.role, "content": _content(m, i)} for i, m in enumerate(body.messages)]
    constraint = structured(body)
    plan = Plan([], [])
    for i in range(body.n):
        plan.requests.append(GenerateRequest(
            messages=messages, adapter_id=adapter_id, structured=constraint,
            sampling=_sampling(body, body.max_completion_tokens or body.max_tokens, default_max, body.logprobs,
                               body.top_logprobs or 0, i)))
        plan.prompt_index.append(0)
    return plan


# -- outputs -------------------------------------------------------------------------------------
def finish_reason(out: RequestOutput) -> str | None:
    return _FINISH.get(out.finish_reason) if out.finish_reason is not None else None


def _lp(x: float) -> float:
    """OpenAI's floor for a token of (numerically) zero probability: JSON has no -Infinity."""
    return x if x >= -9999.0 else -9999.0  # NaN compares false: floored too


class Logprobs:
    """Formats one choice's logprobs as OpenAI does, chunk by chunk (the text offset carries over)."""

    def __init__(self, decode, chat: bool):
        self.decode, self.chat = decode, chat
        self.offset = 0

    def format(self, out: RequestOutput) -> dict | None:
        if out.logprobs is None:
            return None
        toks = [self.decode([t]) for t in out.token_ids]
        tops = out.top_logprobs or [None] * len(toks)
        if self.chat:
            return {"content": [
                {"token": s, "logprob": _lp(lp), "bytes": list(s.encode()),
                 "top_logprobs": [{"token": (ts := self.decode([tid])), "logprob": _lp(tlp),
                                   "bytes": list(ts.encode())}
                                  for tid, tlp in (top or ())]}
                for s, lp, top in zip(toks, out.logprobs, tops)]}
        offsets = []
        for s in toks:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": toks, "token_logprobs": [_lp(x) for x in out.logprobs],
                "top_logprobs": None if out.top_logprobs is None else
                [{self.decode([tid]): _lp(tlp) for tid, tlp in top} for top in out.top_logprobs],
                "text_offset": offsets}


def merge_logprobs(parts: list[dict | None], chat: bool) -> dict | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if chat:
        return {"content": [c for p in parts for c in p["content"]]}
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": None, "text_offset": []}
    for p in parts:
        merged["tokens"] += p["tokens"]
        merged["token_logprobs"] += p["token_logprobs"]
        merged["text_offset"] += p["text_offset"]
        if p["top_logprobs"] is not None:
            merged["top_logprobs"] = (merged["top_logprobs"] or []) + p["top_logprobs"]
    return merged


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
