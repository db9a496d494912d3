"""Request bodies of the OpenAI-compatible API, as pydantic models (they make `/openapi.json`).

Field names and meanings are OpenAI's, plus the extensions vLLM users send (`top_k`, `min_tokens`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, `return_token_ids`, `structured_outputs` and its older
`guided_*` names). Unknown fields are ignored, as
OpenAI and vLLM do; known fields this server does not implement are refused by name (convert.py), never
silently dropped. Responses are plain dicts built in convert.py (one per streamed token: no model
validation on the hot path).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from server.engine.request import MAX_TOP_LOGPROBS

MAX_N = 16  # choices per request (n, times the prompts of a completions request)
MAX_STOP = 16
UINT64_MAX = 2**64 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat share."""

    model: Optional[str] = Field(None, description="the served model name (the base) or an adapter id; "
                                 "default: the base model")
    max_tokens: Optional[int] = Field(None, ge=1, description="tokens to generate at most; default: the "
                                      "server's --default-max-new-tokens")
    temperature: Optional[float] = Field(None, ge=0, description="0 = greedy; default 1")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, description="-1 or 0 = off")
    seed: Optional[int] = Field(None, ge=0, le=UINT64_MAX)
    stop: Optional[Union[str, list[str]]] = Field(None, description=f"up to {MAX_STOP} stop strings")
    stop_token_ids: Optional[list[int]] = Field(None, max_length=256)
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: bool = Field(False, description="vLLM's extension: token_ids in each choice, "
                                   "prompt_token_ids in the response")
    logit_bias: Optional[dict[str, float]] = Field(None, description="not supported: refused when set")
    best_of: Optional[int] = Field(None, description="not supported beyond 1")
    response_format: Optional["ResponseFormat"] = Field(None, description="json_object or json_schema constrains "
                                                        "the output")
    structured_outputs: Optional["StructuredOutputs"] = Field(None, description="vLLM's extension: json, "
                                                              "json_object, regex, choice or grammar")
    guided_json: Optional[Union[dict, str]] = Field(None, description="vLLM's older name of structured_outputs.json")
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                    description="log-probabilities of the sampled tokens and this many "
                                    "alternatives")
    echo: bool = False
    suffix: Optional[str] = Field(None, description="not supported: refused when set")


class TextPart(_Body):
    type: str
    text: Optional[str] = None


class ChatMessage(_Body):
    role: str = Field(min_length=1)
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class JsonSchemaFormat(_Body):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[Union[dict, bool]] = Field(None, alias="schema", description="the JSON Schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extension: exactly one of these."""

    json_: Optional[Union[dict, bool, str]] = Field(None, alias="json", description="a JSON Schema (object or text)")
    json_object: Optional[bool] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = Field(None, description="an EBNF grammar (start rule `root`)")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="takes precedence over max_tokens")
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[dict]] = Field(None, description="not supported: refused when non-empty")


class LoadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: Optional[str] = Field(None, description="a PEFT directory; default: <adapter root>/<lora_name>")


class UnloadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)


_Sampling.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
