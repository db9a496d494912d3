"""Protobuf messages <-> the engine's Python types. Proto3 zero values mean "off" / "server default"."""
from __future__ import annotations

from proto import tessera_pb2 as pb
from server.errors import InvalidRequestError
from server.engine.request import FinishReason, GenerateRequest, RequestOutput, SamplingParams
from server.engine.structured import StructuredOutput

_FINISH = {FinishReason.LENGTH: pb.LENGTH, FinishReason.STOP: pb.STOP, FinishReason.EOS: pb.EOS,
           FinishReason.CANCELLED: pb.CANCELLED, FinishReason.ERROR: pb.ERROR}

MAX_STOP_STRINGS = 16


def to_engine_request(msg: pb.GenerateRequest, default_max_new_tokens: int) -> GenerateRequest:
    """Raises InvalidRequestError naming every problem with the message."""
    inputs = [bool(msg.prompt), len(msg.messages) > 0, len(msg.prompt_token_ids) > 0]
    if sum(inputs) == 0:
        raise InvalidRequestError("the request has no input: set prompt, messages or prompt_token_ids")
    if sum(inputs) > 1:
        raise InvalidRequestError("set only one of prompt, messages or prompt_token_ids")
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(msg.stop)}")
    try:
        sampling = SamplingParams(
            max_new_tokens=msg.max_new_tokens or default_max_new_tokens,
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p if msg.top_p != 0 else 1.0,
            repetition_penalty=msg.repetition_penalty if msg.repetition_penalty != 0 else 1.0,
            seed=msg.seed if msg.HasField("seed") else None,
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            logprobs=msg.logprobs,
        )
        return GenerateRequest(
            prompt=msg.prompt or None,
            messages=[{"role": m.role, "content": m.content} for m in msg.messages] or None,
            prompt_token_ids=list(msg.prompt_token_ids) or None,
            sampling=sampling,
            request_id=msg.request_id or None,
            adapter_id=msg.adapter_id or None,
            task_id=msg.task_id if msg.HasField("task_id") else None,
            structured=_structured(msg),
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def _structured(msg: pb.GenerateRequest) -> StructuredOutput | None:
    if not msg.HasField("structured_output"):
        return None
    so = msg.structured_output
    kind = so.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_output is set but empty: set one of json_schema, json_object, regex, "
                         "choice or grammar")
    if kind == "json_object" and not so.json_object:
        raise ValueError("structured_output.json_object must be true when set")
    value = tuple(so.choice.choices) if kind == "choice" else getattr(so, kind)
    return StructuredOutput(**{kind: value})


def to_response(out: RequestOutput) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(text=out.text, token_ids=out.token_ids, request_id=out.request_id)
    if out.logprobs:
        msg.logprobs.extend(out.logprobs)
    if out.finish_reason is not None:
        msg.finish_reason = _FINISH[out.finish_reason]
        if out.error:
            msg.error = out.error
        if out.stats is not None:
            st = out.stats
            msg.prompt_tokens = st.prompt_tokens
            msg.generated_tokens = st.generated_tokens
            msg.time_to_first_token_s = st.time_to_first_token_s
            msg.e2e_latency_s = st.e2e_latency_s
            msg.queue_time_s = st.queue_time_s
    return msg
