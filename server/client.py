"""A small command-line client: `python -m server.client "prompt" [--adapter ID] [--stream]`."""
from __future__ import annotations

import argparse
import os
import sys

import grpc

from proto import tessera_pb2 as pb
from proto import tessera_pb2_grpc as pb_grpc

_REASONS = {v: k for k, v in pb.FinishReason.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.client", description="Send one Generate call to a "
                                 "Tessera server and print the text.")
    ap.add_argument("prompt", help="the prompt (sent as a chat message with --chat)")
    ap.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    ap.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    ap.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ap.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"), help="default: $TESSERA_API_KEY")
    ap.add_argument("--tls-ca", default=None, help="PEM CA to verify the server (enables TLS)")
    ap.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    ap.add_argument("--usage", action="store_true", help="print token counts and latency at the end")
    args = ap.parse_args(argv)

    req = pb.GenerateRequest(adapter_id=args.adapter, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             repetition_penalty=args.repetition_penalty, stop=args.stop)
    if args.chat:
        req.messages.add(role="user", content=args.prompt)
    else:
        req.prompt = args.prompt
    if args.seed is not None:
        req.seed = args.seed
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(args.target)
    stub = pb_grpc.InferenceStub(channel)
    last = None
    call = stub.Generate(req, metadata=metadata, timeout=args.timeout)
    try:
        for msg in call:
            if args.stream:
                print(msg.text, end="", flush=True)
            last = msg if last is None else _merge(last, msg)
    except grpc.RpcError as err:
        print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: cancel the stream (the server frees its KV blocks), no traceback
        call.cancel()
        print("\n[cancelled]", file=sys.stderr)
        return 130
    if not args.stream:
        print(last.text if last else "", end="")
    print()
    if args.usage and last is not None:
        print(f"[{_REASONS[last.finish_reason]}] prompt {last.prompt_tokens} tokens, generated "
              f"{last.generated_tokens}, first token after {last.time_to_first_token_s * 1000:.0f} ms, "
              f"total {last.e2e_latency_s:.2f} s", file=sys.stderr)
    return 0


def _merge(acc: pb.GenerateResponse, msg: pb.GenerateResponse) -> pb.GenerateResponse:
    text = acc.text + msg.text
    ids = list(acc.token_ids) + list(msg.token_ids)
    out = pb.GenerateResponse()
    out.CopyFrom(msg)
    out.text = text
    del out.token_ids[:]
    out.token_ids.extend(ids)
    return out


if __name__ == "__main__":
    sys.exit(main())
