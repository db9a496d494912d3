"""Issue 20, structured output in the real engine on the real SmolLM2: JSON schemas (nested objects, arrays,
enums, bounded numbers, required fields, string patterns), regex, choice and EBNF constraints in one mixed
batch with free requests, over the base and LoRA, prefix-tuning and IA3 adapters, greedy and sampled; every
constrained output parses and validates; a constraint the free greedy output already satisfies changes no
token; a free request's tokens do not change when constrained ones share its batch; bad constraints are
refused naming the field; a length cut is reported as length; stop strings and logprobs work with them."""
from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest

from server.config import EngineConfig
from server.engine.request import FinishReason, GenerateRequest, SamplingParams
from server.engine.structured import StructuredOutput
from server.errors import InvalidRequestError
from tests import peft_adapters as lora_oracle
from tests import peft_prompt_adapters as prompt_oracle
from tests import smollm2

pytestmark = pytest.mark.slow  # the real SmolLM2

ADAPTERS = (None, "r8-all-linear", "prefix", "ia3")
SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24}}, "required": ["name", "age", "city"],
        "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
                 "required": ["id", "email"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                   "minItems": 1, "maxItems": 3}}, "required": ["colors"], "additionalProperties": False},
    "enum-number": {"type": "object", "properties": {
        "size": {"enum": ["small", "medium", "large"]},
        "price": {"type": "number", "minimum": 0.5, "maximum": 99.5}}, "required": ["size", "price"],
        "additionalProperties": False},
}
PROMPT = "Answer with a JSON object only. Describe a {} for a database record."


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    shutil.copytree(lora_oracle.build("r8-all-linear"), root / "r8-all-linear")
    for name in ("prefix", "ia3"):
        shutil.copytree(prompt_oracle.build(name), root / name)
    e = smollm2.engine(EngineConfig(adapter_root=str(root)))
    for name in ADAPTERS[1:]:
        e.adapters.load(name)
    return e


def run(engine, requests) -> dict:
    """All requests in one batch -> id -> (text, token ids, finish reason, logprobs)."""
    for r in requests:
        engine.add(engine.make_sequence(r))
    out = {r.request_id: ["", [], None, []] for r in requests}
    while engine.has_work():
        for o in engine.step():
            rec = out[o.request_id]
            rec[0] += o.text
            rec[1] += o.token_ids
            rec[3] += o.logprobs or []
            if o.finished:
                rec[2] = o.finish_reason
                assert o.error is None, (o.request_id, o.error)
    return {k: tuple(v) for k, v in out.items()}


def chat(rid, text, adapter=None, structured=None, temperature=0.0, seed=None, max_new=96, **kw):
    return GenerateRequest(messages=[{"role": "user", "content": text}], request_id=rid, adapter_id=adapter,
                           structured=structured, sampling=SamplingParams(max_new_tokens=max_new,
                                                                          temperature=temperature, seed=seed, **kw))


def test_mixed_batch_every_output_is_valid_and_free_requests_are_unchanged(engine):
    free = [chat(f"free-{i}", "Name three fruits.", adapter=a, max_new=12) for i, a in enumerate(ADAPTERS)]
    alone = {}
    for r in free:
        alone.update(run(engine, [r]))
    constrained = []
    for si, (name, schema) in enumerate(SCHEMAS.items()):
        for ai, adapter in enumerate(ADAPTERS):
            sampled = (si + ai) % 2 == 1
            constrained.append(chat(f"{name}|{adapter}|{'sampled' if sampled else 'greedy'}", PROMPT.format(name),
                                    adapter=adapter, structured=StructuredOutput(json_schema=json.dumps(schema)),
                                    temperature=0.9 if sampled else 0.0, seed=si * 10 + ai))
    others = [
        chat("regex", "Write a US phone number.", structured=StructuredOutput(regex=r"\(\d{3}\) \d{3}-\d{4}"),
             adapter="prefix"),
        chat("choice", "Is the sky blue? Answer yes or no.", adapter="r8-all-linear",
             structured=StructuredOutput(choice=("yes", "no", "maybe not"))),
        chat("grammar", "Add two small numbers.", adapter="ia3", temperature=0.7, seed=3,
             structured=StructuredOutput(grammar='root ::= num " + " num " = " num\nnum ::= [1-9] [0-9]?')),
        chat("json-object", "Give me any JSON object about a cat.", structured=StructuredOutput(json_object=True),
             temperature=0.8, seed=4),
    ]
    out = run(engine, free + constrained + others)
    for r in free:  # sharing steps with constrained rows changed nothing for them
        assert out[r.request_id][1] == alone[r.request_id][1], r.request_id
    for r in constrained:
        text, _, reason, _ = out[r.request_id]
        assert reason is FinishReason.EOS, (r.request_id, reason, text)
        jsonschema.validate(json.loads(text), SCHEMAS[r.request_id.split("|")[0]])
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", out["regex"][0]), out["regex"]
    assert out["choice"][0] in ("yes", "no", "maybe not")
    assert re.fullmatch(r"[1-9][0-9]? \+ [1-9][0-9]? = [1-9][0-9]?", out["grammar"][0]), out["grammar"]
    assert isinstance(json.loads(out["json-object"][0]), dict)
    assert all(out[r.request_id][2] is FinishReason.EOS for r in others)


def _literal(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)


@pytest.mark.parametrize("adapter", [None, "r8-all-linear"])
def test_a_constraint_the_free_output_satisfies_changes_no_token(engine, adapter):
    free = run(engine, [chat("free", "Tell me about the moon.", adapter=adapter, max_new=16)])["free"]
    assert free[2] is FinishReason.LENGTH and free[0]
    loose = StructuredOutput(regex=_literal(free[0]) + r"[\s\S]*")  # the free output, then anything
    got = run(engine, [chat("c", "Tell me about the moon.", adapter=adapter, max_new=16, structured=loose,
                            logprobs=True)])["c"]
    assert got[1] == free[1] and got[2] is FinishReason.LENGTH
    assert len(got[3]) == 16 and all(lp <= 0.0 for lp in got[3])


def test_a_length_cut_is_reported_as_length(engine):
    so = StructuredOutput(json_schema=json.dumps(SCHEMAS["person"]))
    text, ids, reason, _ = run(engine, [chat("cut", PROMPT.format("person"), structured=so, max_new=5)])["cut"]
    assert reason is FinishReason.LENGTH and len(ids) == 5
    with pytest.raises(ValueError):
        json.loads(text)


def test_stop_strings_and_ignore_eos_with_a_constraint(engine):
    out = run(engine, [
        chat("stop", "Say alpha.", structured=StructuredOutput(choice=("alpha beta", "alpha gamma")), stop=(" ",)),
        chat("eos", "Say yes.", structured=StructuredOutput(choice=("yes", "no")), ignore_eos=True, max_new=20)])
    assert out["stop"][0] == "alpha" and out["stop"][2] is FinishReason.STOP
    # ignore_eos: the grammar's end still ends the request (nothing may follow it)
    assert out["eos"][0] in ("yes", "no") and out["eos"][2] is FinishReason.EOS


@pytest.mark.parametrize("so,match", [
    (dict(json_schema="{not json"), "structured_output.json_schema is not valid JSON"),
    (dict(json_schema='{"type": "wrong"}'), "structured_output.json_schema: .*wrong"),
    (dict(json_schema="[1, 2]"), "must be a JSON object"),
    (dict(regex="(unclosed"), "structured_output.regex: .*parenthesis"),
    (dict(grammar="root ::= missing_rule"), "structured_output.grammar: .*missing_rule"),
    (dict(choice=()), "structured_output.choice needs one or more"),
    (dict(), "structured_output: set exactly one of json_schema"),
    (dict(choice=("a", "")), "structured_output.choice needs one or more non-empty strings"),
    (dict(regex="a", grammar="root ::= \"a\""), "set exactly one of .*got regex, grammar"),
    (dict(regex="   "), "structured_output.regex is empty"),
    # bounded before compiling: a pattern [a-z]{1,20000} inside a JSON string takes xgrammar over 20 s
    (dict(json_schema=json.dumps({"type": "string", "pattern": "^[a-z]{1,20000}$"})),
     "structured_output.json_schema pattern: a repetition bound of 20000 is over 1000"),
    (dict(regex="(a{1,400}){1,400}"), "structured_output.regex: its repetition bounds multiply"),
])
def test_bad_constraints_are_refused_naming_the_field(engine, so, match):
    with pytest.raises((InvalidRequestError, ValueError), match=match):
        engine.make_sequence(chat("bad", "x", structured=StructuredOutput(**so)))
    assert not engine.has_work()


def test_compilations_are_cached_per_constraint(engine):
    so = StructuredOutput(json_schema=json.dumps({"type": "object", "properties": {"k": {"type": "integer"}},
                                                  "required": ["k"]}))
    before = engine.grammars.num_compiled
    for i in range(3):
        engine.discard(engine.make_sequence(chat(f"c{i}", "x", structured=so)))
    assert engine.grammars.num_compiled == before + 1 and engine.grammars.num_cache_hits >= 2


def test_a_constraint_not_compiled_in_time_is_refused_and_later_served_from_the_cache(engine, monkeypatch):
    so = StructuredOutput(json_schema=json.dumps({"type": "object", "properties": {
        f"f{i}": {"type": "string", "pattern": "^[a-z]{2,9}$"} for i in range(40)}}))
    monkeypatch.setattr(engine.grammars, "timeout_s", 1e-6)
    with pytest.raises(InvalidRequestError, match="structured_output.json_schema: not compiled within") as err:
        engine.make_sequence(chat("slow", "x", structured=so))
    assert err.value.param == "structured_output.json_schema" and not engine.has_work()
    engine.grammars.submit(so).result(timeout=60)  # the compilation went on in its own thread
    monkeypatch.setattr(engine.grammars, "timeout_s", 10.0)
    hits = engine.grammars.num_cache_hits
    engine.discard(engine.make_sequence(chat("slow-again", "x", structured=so)))
    assert engine.grammars.num_cache_hits > hits
