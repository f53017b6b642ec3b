"""The serving side of the `moeserve` command: `moeserve serve` and `moeserve generate --endpoint`.

Argument definitions and the two commands only; `cli.py` wires them in. Defaults of the listening
ports and the model path may come from the environment variables named in `moeserve.contract`
(flags win). Bad arguments exit with code 2, RPC errors with code 1 and the status on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from moeserve import contract, extras
from moeserve.engine_settings import EngineSettings, RequestLimits
from moeserve.workers.cli import expert_parallel as ep_cli
from moeserve.workers.cli import speculative as spec_cli
from moeserve.workers.cli.args import add_fp8_weights_argument

DEFAULT_HTTP_PORT = 8000


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def add_serve_parser(sub: argparse._SubParsersAction, dtypes: list[str], default_model: Path) -> None:
    d = EngineSettings()
    lim = RequestLimits()
    serve = sub.add_parser("serve", help="serve the gRPC API on this machine (no Ray)")
    serve.add_argument(
        "--model",
        type=Path,
        default=Path(os.environ.get(contract.ENV_MODEL_PATH) or default_model),
        help=f"checkpoint directory (default: ${contract.ENV_MODEL_PATH} or the embedded model)",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument(
        "--port",
        type=int,
        default=_env_int(contract.ENV_GRPC_PORT, contract.DEFAULT_GRPC_PORT),
        help=f"gRPC port (default {contract.DEFAULT_GRPC_PORT}; 0 picks a free one)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int(contract.ENV_METRICS_PORT, contract.DEFAULT_METRICS_PORT),
        help=f"Prometheus port (default {contract.DEFAULT_METRICS_PORT}; 0 picks a free one)",
    )
    serve.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    serve.add_argument(
        "--http-port",
        type=int,
        default=None,
        help=f"OpenAI HTTP API port (default {DEFAULT_HTTP_PORT}; 0 picks a free one)",
    )
    serve.add_argument("--no-http", action="store_true", help="serve no OpenAI HTTP API")
    serve.add_argument(
        "--served-model-name", default=None, help="model name of the HTTP API (default: --model's name)"
    )
    serve.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        help="jinja2 chat template file (default: chat_template of the model's tokenizer_config.json)",
    )
    add_fp8_weights_argument(serve)
    serve.add_argument(
        "--dtype",
        choices=dtypes,
        default="auto",
        help="compute dtype; auto (default): the checkpoint's own where this host computes it natively, "
        "else float32; the choice is printed to stderr",
    )
    serve.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    serve.add_argument("--kv-cache-tokens", type=int, default=d.kv_cache_tokens, help="KV-cache capacity")
    serve.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="running batch size limit")
    serve.add_argument(
        "--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="token budget per step"
    )
    serve.add_argument("--max-waiting", type=int, default=d.max_waiting, help="waiting queue bound")
    serve.add_argument("--max-model-len", type=int, default=None, help="prompt + completion limit")
    serve.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="compute every prompt from scratch (default: reuse the KV blocks of cached prefixes)",
    )
    for flag, default, what in (
        ("--max-prompt-bytes", lim.max_prompt_bytes, "UTF-8 bytes of a text prompt"),
        ("--max-stop-strings", lim.max_stop_strings, "stop strings per request"),
        ("--max-stop-bytes", lim.max_stop_bytes, "UTF-8 bytes of a request's stop strings in all"),
        ("--max-stop-token-ids", lim.max_stop_token_ids, "stop token ids per request"),
        ("--max-request-id-bytes", lim.max_request_id_bytes, "UTF-8 bytes of a request_id"),
    ):
        serve.add_argument(
            flag, type=int, default=default, help=f"at most this many {what} (default {default})"
        )
    serve.add_argument(
        "--tls-cert", type=Path, default=None, help="PEM certificate chain: serve gRPC over TLS"
    )
    serve.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", type=Path, default=None, help="PEM CA bundle: require client certificates (mTLS)"
    )
    serve.add_argument("--grace", type=float, default=5.0, help="seconds streams get to finish on SIGTERM")
    serve.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    serve.add_argument(
        "--attention-ranks", type=int, default=1, help="attention-rank processes (with --expert-ranks)"
    )
    serve.add_argument(
        "--expert-ranks",
        type=int,
        default=0,
        help="expert-rank processes; 0 (default) serves the whole model in this process",
    )
    serve.add_argument(
        "--collective-timeout", type=float, default=60.0, help="seconds a rank waits in a collective"
    )
    ep_cli.add_balance_arguments(serve)
    serve.add_argument(
        "--ray", action="store_true", help="serve through Ray Serve (its gRPC proxy on --port)"
    )
    serve.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (default: start a local one)"
    )
    serve.add_argument("--replicas", type=int, default=1, help="model instances (with --ray)")
    spec_cli.add_arguments(serve)


def add_endpoint_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--endpoint", default=None, help="HOST:PORT of a moeserve server; stream from it")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --endpoint)")
    gen.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --endpoint)")
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable (with --endpoint)")


def check_offline_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k), ("--stop", args.stop)):
        if value:
            parser.error(f"{flag} needs --endpoint")


def tls_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> object:
    """`TLSFiles` from --tls-cert/--tls-key/--tls-client-ca, None for plaintext; exit 2 if incomplete."""
    from moeserve.workers.server.app import TLSFiles

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            parser.error("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        parser.error("--tls-cert and --tls-key go together")
    for flag, path in (
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--tls-client-ca", args.tls_client_ca),
    ):
        if path is not None and not path.is_file():
            parser.error(f"{flag}: no file {path}")
    if args.ray:
        parser.error("--tls-cert: not with --ray (Ray Serve's gRPC proxy serves plaintext only)")
    return TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca)


def engine_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EngineSettings:
    """The engine flags as the one `EngineSettings` (for local engines and the Ray Serve app alike)."""
    try:
        limits = RequestLimits(
            max_prompt_bytes=args.max_prompt_bytes,
            max_stop_strings=args.max_stop_strings,
            max_stop_bytes=args.max_stop_bytes,
            max_stop_token_ids=args.max_stop_token_ids,
            max_request_id_bytes=args.max_request_id_bytes,
        )
        settings = EngineSettings(
            limits=limits,
            block_size=args.block_size,
            kv_cache_tokens=args.kv_cache_tokens,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting=args.max_waiting,
            max_model_len=args.max_model_len,
            prefix_caching=not args.no_prefix_caching,
            speculative=args.speculative,
            num_speculative_tokens=spec_cli.check(parser, args, args.model),
        )
    except ValueError as e:
        field, _, problem = str(e).partition(": ")
        parser.error(f"--{field.replace('_', '-')}: {problem}")
    return settings


def http_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> object:
    """`HTTPOptions` from --http-port/--no-http/--served-model-name/--chat-template; None: no HTTP."""
    from moeserve.workers.server.openai_api.chat_template import ChatTemplate, ChatTemplateError
    from moeserve.workers.server.openai_api.routes import HTTPOptions

    if args.no_http:
        for flag, value in (("--http-port", args.http_port), ("--chat-template", args.chat_template)):
            if value is not None:
                parser.error(f"{flag}: not with --no-http")
        return None
    port = DEFAULT_HTTP_PORT if args.http_port is None else args.http_port
    if not 0 <= port <= 65535:
        parser.error(f"--http-port: must be in [0, 65535], got {port}")
    if args.chat_template is not None and not args.chat_template.is_file():
        parser.error(f"--chat-template: no file {args.chat_template}")
    try:
        template = ChatTemplate.from_model_dir(args.model, args.chat_template)
    except (ChatTemplateError, ValueError, OSError) as e:
        flag = "--chat-template" if args.chat_template is not None else "--model"
        parser.error(f"{flag}: {e}")
    return HTTPOptions(port, args.served_model_name or None, template)


def run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace, dtypes: dict[str, object]) -> int:
    from moeserve.workers.server.app import InferenceServer, Listen, local_loader, serve

    if not (args.model / "config.json").exists():
        parser.error(f"--model: no config.json in {args.model}")
    tls = tls_files(parser, args)
    settings = engine_settings(parser, args)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    http = http_options(parser, args)
    listen = Listen(args.host, args.port, None if args.no_metrics else args.metrics_port, tls, http)  # type: ignore[arg-type]

    def announce(server: InferenceServer) -> None:
        metrics = f", metrics on :{server.metrics_port}" if server.metrics_port is not None else ""
        if server.http_port is not None:
            metrics += f", OpenAI HTTP API on :{server.http_port}"
        scheme = " (TLS)" if tls is not None else ""
        print(
            f"moeserve: listening on {args.host}:{server.port}{scheme}{metrics}; loading {args.model}",
            flush=True,
        )

    if args.attention_ranks < 1:
        parser.error(f"--attention-ranks: must be >= 1, got {args.attention_ranks}")
    if args.expert_ranks < 0:
        parser.error(f"--expert-ranks: must be >= 0, got {args.expert_ranks}")
    if args.expert_ranks == 0 and args.attention_ranks != 1:
        parser.error("--attention-ranks > 1 needs --expert-ranks >= 1")
    if (args.redundant_experts or args.rebalance_interval) and args.expert_ranks == 0 and not args.ray:
        parser.error("--redundant-experts and --rebalance-interval need --expert-ranks >= 1")
    if args.ray:
        extras.require_or_exit(extras.RAY, "--ray (Ray Serve)", "moeserve serve")
    import torch

    from moeserve.workers.cli.dtype import resolve_dtype_or_exit

    # Resolved here, once: the Ray ranks get the name (they may sit on other hosts of the same kind).
    args.dtype = str(resolve_dtype_or_exit(parser, args.dtype, args.model, torch.device("cpu"))).removeprefix(
        "torch."
    )
    if args.ray:
        return run_ray_serve(parser, args)
    if args.expert_ranks:
        from moeserve.workers.parallel.settings import EPSettings
        from moeserve.workers.server.local_ranks import ep_loader

        ep = EPSettings(
            args.attention_ranks,
            args.expert_ranks,
            collective_timeout_s=args.collective_timeout,
            dtype=dtypes[args.dtype],  # type: ignore[arg-type]
            fp8_weights=args.fp8_weights,
            block_size=settings.block_size,
            **ep_cli.balance_settings(args),
        )
        ep_cli.check_placement(parser, ep, args.model)
        loader = ep_loader(args.model, dtypes[args.dtype], settings, ep)  # type: ignore[arg-type]
    else:
        loader = local_loader(args.model, dtypes[args.dtype], settings, args.fp8_weights)  # type: ignore[arg-type]
    asyncio.run(serve(listen, loader, args.grace, announce))
    # Everything is closed. Skip the interpreter's teardown: winding down grpc's, torch's and the
    # tokenizer's thread pools can take seconds, and SIGTERM must end within --grace + 2 s.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ray_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`moeserve serve --ray`: the same flags, as the `ServeAppConfig` the operator would generate."""
    from moeserve.serve_config import ModelSpec, OpenAISpec, Ports, ServeAppConfig, ServeConfigError
    from moeserve.workers.ray_app.app import run_with_ray

    http = http_options(parser, args)  # checks the flags and the template; Ray's proxy gets a fixed port
    http_port = 0 if http is None else (http.port or free_port(args.host))  # type: ignore[attr-defined]
    template = "" if args.chat_template is None else args.chat_template.read_text()
    cfg = ServeAppConfig(
        model=ModelSpec(path=str(args.model), dtype=args.dtype, fp8_weights=args.fp8_weights),
        replicas=args.replicas,
        attention_ranks=args.attention_ranks,
        expert_ranks=args.expert_ranks or 1,
        redundant_experts=args.redundant_experts,
        rebalance_interval=args.rebalance_interval,
        rebalance_min_gain=args.rebalance_min_gain,
        collective_timeout_s=args.collective_timeout,
        engine=engine_settings(parser, args),
        ports=Ports(grpc=args.port, metrics=args.metrics_port, http=http_port),
        openai=OpenAISpec(served_model_name=args.served_model_name or "", chat_template=template),
    )
    try:
        cfg.validate()
    except ServeConfigError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_with_ray(cfg, args.ray_address, args.host)
    return 0


def free_port(host: str) -> int:
    """A port free on `host` now, for `--ray --http-port 0` (Ray Serve's proxy needs a fixed one)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_remote_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import grpc

    from moeserve.workers.client import FINISH_REASON_NAMES, Completion, InferenceClient, build_request

    if args.model is not None:
        parser.error("--model and --endpoint are exclusive (the server has its model)")
    if bool(args.prompt) == bool(args.prompt_ids):
        parser.error("give exactly one of --prompt or --prompt-ids (each may repeat)")
    prompts: list[tuple[str | None, list[int] | None]] = [(p, None) for p in args.prompt] or [
        (None, ids) for ids in args.prompt_ids
    ]
    with InferenceClient(args.endpoint) as client:
        for text, ids in prompts:
            request = build_request(
                text,
                ids,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
            )
            done = Completion()
            try:
                for chunk in client.stream(request):  # print text as it streams
                    done.token_ids.extend(chunk.token_ids)
                    done.text += chunk.text
                    done.finish_reason = FINISH_REASON_NAMES[chunk.finish_reason]
                    done.prompt_tokens = chunk.usage.prompt_tokens
                    done.completion_tokens = chunk.usage.completion_tokens
                    if not args.json:
                        print(chunk.text, end="", flush=True)
            except grpc.RpcError as e:
                print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            if args.json:
                record = {
                    "prompt": text,
                    "token_ids": done.token_ids,
                    "text": done.text,
                    "finish_reason": done.finish_reason,
                    "usage": {
                        "prompt_tokens": done.prompt_tokens,
                        "completion_tokens": done.completion_tokens,
                    },
                }
                print(json.dumps(record, ensure_ascii=False))
            else:  # a model without a tokenizer streams no text: show the ids
                print("" if done.text else " ".join(map(str, done.token_ids)), flush=True)
    return 0
