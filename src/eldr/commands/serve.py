"""`eldr serve`: the OpenAI-compatible prefill/decode proxy with ELDR decode routing.

The web stack (starlette, httptools, uvloop, orjson, prometheus-client, pyyaml: the `serve` extra) is
imported inside `run`, so `eldr --help` works without it. The proxy runs on its own HTTP server
(`eldr.proxy.server`), on uvloop when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
from typing import Any

from eldr.commands.arguments import engine_url, float_in, int_in, nonempty_text, tau_value
from eldr.errors import ConfigError
from eldr.policy import FEWEST_NEW_EXPERTS, POLICIES, SERVE_POLICIES
from eldr.proxy.config import RANGES

# flag -> (config field, type, help); every key of the YAML file has the flag of the same name
_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--partition", "partition", str, "partition file from `eldr fit`; needed by --policy eldr"),
    (
        "--policy",
        "policy",
        str,
        "decode routing policy (default eldr): "
        + "; ".join(f"{name}: {POLICIES[name].summary}" for name in SERVE_POLICIES)
        + " (docs/serving.md)",
    ),
    ("--tau", "tau", tau_value, "locality band width for eldr (default 0.1; 0 = pure locality, 1 = JSQ)"),
    (
        "--top-k",
        "top_k",
        int,
        "fewest-new-experts: experts per token of the model (default 0: the --partition's top_k)",
    ),
    (
        "--lam",
        "lam",
        float,
        "fewest-new-experts: load weight, expert reads per in-flight request (default 20.8: Qwen3-30B-A3B "
        "on MI300X, 1,000-token contexts; docs/simulator.md)",
    ),
    ("--seed", "seed", int, "seed of the policies' tie-breaking (default 0)"),
    (
        "--host",
        "host",
        str,
        "address to listen on (default 127.0.0.1); 0.0.0.0 or :: (every interface) needs --allow-public-host",
    ),
    ("--port", "port", int, "port to listen on (default 8000; 0 = any free port)"),
    (
        "--prefill-policy",
        "prefill_policy",
        str,
        "prefill choice: least-loaded (default) or prefix-hash (consistent hash of the prompt's first bytes, "
        "least-loaded above --hash-load-factor x mean load)",
    ),
    ("--prefix-bytes", "prefix_bytes", int, "prefix-hash: bytes of the prompt hashed (default 1024)"),
    (
        "--hash-virtual-nodes",
        "hash_virtual_nodes",
        int,
        "prefix-hash: virtual nodes per instance (default 160)",
    ),
    ("--hash-load-factor", "hash_load_factor", float, "prefix-hash: load guard, x mean load (default 1.25)"),
    ("--connect-timeout-s", "connect_timeout_s", float, "TCP connect timeout to an engine (default 5)"),
    ("--prefill-timeout-s", "prefill_timeout_s", float, "limit on the whole prefill leg (default 60)"),
    (
        "--decode-timeout-s",
        "decode_timeout_s",
        float,
        "limit until the decode leg's first byte; for non-streaming requests the whole answer (default 60)",
    ),
    (
        "--stream-idle-timeout-s",
        "stream_idle_timeout_s",
        float,
        "longest gap between two chunks of a decode stream (default 60)",
    ),
    (
        "--max-attempts",
        "max_attempts",
        int,
        "prefill+decode attempts per request, failing over to other instances (default 3)",
    ),
    (
        "--keep-alive-s",
        "keep_alive_s",
        float,
        "idle client connections are closed after this many seconds (default 75; keep it above your "
        "clients' own keep-alive expiry, or a request sent as the proxy closes the connection fails)",
    ),
    ("--max-concurrency", "max_concurrency", int, "requests handled at once (default 1024)"),
    (
        "--max-queue",
        "max_queue",
        int,
        "requests waiting for a slot; beyond it: 429 + Retry-After (default 1024)",
    ),
    (
        "--queue-timeout-s",
        "queue_timeout_s",
        float,
        "longest wait for a slot; then 503 + Retry-After (default 10)",
    ),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body; beyond it: 413 (default 16 MiB)"),
    (
        "--max-body-bytes-in-flight",
        "max_body_bytes_in_flight",
        int,
        "request body bytes held by all requests inside the proxy together; a body that does not fit: "
        "429 + Retry-After, before it is read when it declares its length (default 256 MiB, at least "
        "--max-body-bytes)",
    ),
    (
        "--max-answer-bytes",
        "max_answer_bytes",
        int,
        "largest engine answer read whole, or SSE event relayed; beyond it the leg fails (default 256 MiB)",
    ),
    (
        "--max-answer-header-bytes",
        "max_answer_header_bytes",
        int,
        "largest status line + headers of an engine's answer (and of a chunked answer's framing and "
        "trailers); beyond it the leg fails and fails over (default 64 KiB)",
    ),
    (
        "--offload-answer-bytes",
        "offload_answer_bytes",
        int,
        "prefill answers larger than this (vLLM's routed-expert lists of long prompts) are parsed in a "
        "worker process, off the event loop (default 1 MiB; 0 = every answer)",
    ),
    (
        "--max-header-bytes",
        "max_header_bytes",
        int,
        "largest request line + headers of a client request; beyond it: 431 and the connection is closed, "
        "the rest unread (default 64 KiB)",
    ),
    (
        "--client-header-timeout-s",
        "client_header_timeout_s",
        float,
        "time a client has for a request's head, from the connection's start or the request's first byte; "
        "then 408 and the connection is closed (default 10)",
    ),
    (
        "--client-body-timeout-s",
        "client_body_timeout_s",
        float,
        "time a client has for a request's whole body after its head; then 408, connection closed "
        "(default 60)",
    ),
    (
        "--client-write-timeout-s",
        "client_write_timeout_s",
        float,
        "a client that takes none of its answer's bytes this long (stopped reading a stream) is "
        "disconnected and its request cancelled (default 30)",
    ),
    (
        "--max-connections",
        "max_connections",
        int,
        "open client connections; beyond it a new one gets 503 + Retry-After and is closed (default 4096; "
        "lowered at start, with a warning, to what the open-files limit allows)",
    ),
    (
        "--shutdown-timeout-s",
        "shutdown_timeout_s",
        float,
        "on SIGTERM/SIGINT: time running requests get to finish before they are cut (default 10)",
    ),
    ("--health-interval-s", "health_interval_s", float, "seconds between active health checks (default 2)"),
    ("--health-timeout-s", "health_timeout_s", float, "timeout of one health check (default 2)"),
    ("--eject-after", "eject_after", int, "consecutive failed checks that eject an instance (default 2)"),
    ("--recover-after", "recover_after", int, "consecutive good checks that bring it back (default 1)"),
    (
        "--load-signal",
        "load_signal",
        str,
        "router (in-flight tracked here, default) or blend (max of that and the engine's "
        "vllm:num_requests_running + waiting, scraped at each health check; keeps replicas consistent)",
    ),
    (
        "--refit-every",
        "refit_every",
        int,
        "eldr: refit the centroids after this many routed signatures, off the event loop (default 0 = off)",
    ),
    ("--refit-window", "refit_window", int, "eldr: recent signatures a refit clusters (default 2000)"),
    (
        "--api-key",
        "api_key",
        str,
        "clients must send Authorization: Bearer KEY on /v1/* (and /health, /metrics unless "
        "--public-health-metrics; default: no key)",
    ),
    ("--admin-token", "admin_token", str, "enables /admin/* with Authorization: Bearer TOKEN (default: off)"),
    (
        "--forward-auth",
        "forward_auth",
        str,
        "Authorization sent to engines: none (default), client (relay the client's), engine-key",
    ),
    (
        "--engine-api-key",
        "engine_api_key",
        str,
        "key sent to engines as Bearer with --forward-auth engine-key",
    ),
    ("--log-level", "log_level", str, "debug, info (default), warning, error"),
)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible prefill/decode proxy in front of vLLM",
        description=(
            "An OpenAI-compatible proxy for vLLM prefill/decode disaggregation. Each request is prefilled on "
            "one --prefill instance (max_tokens 1, kv_transfer_params do_remote_decode), its expert "
            "signature is read from the answer, and the --decode instance is chosen by the policy "
            "(eldr: locality band over the partition's centroids, centroid k = k-th --decode URL). "
            "Settings come from --config and/or flags (flags win); see docs/serving.md."
        ),
    )
    p.add_argument(
        "--config",
        type=nonempty_text,
        metavar="FILE",
        help="YAML file whose keys are the flags' names in snake_case (at most 1 MiB)",
    )
    p.add_argument(
        "--prefill",
        action="append",
        type=engine_url,
        metavar="URL",
        help="a prefill instance, http://host:port (repeat)",
    )
    p.add_argument(
        "--decode",
        action="append",
        type=engine_url,
        metavar="URL",
        help="a decode instance, http://host:port (repeat; order = partition)",
    )
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        type=nonempty_text,
        metavar="NAME",
        help="served model name (repeat); default: learned from the engines' /v1/models; others get 404",
    )
    for flag, dest, kind, text in _FLAGS:
        p.add_argument(flag, dest=dest, type=_checked(dest, kind), default=None, help=text)
    p.add_argument(
        "--admin-engine-host",
        action="append",
        dest="admin_engine_hosts",
        type=nonempty_text,
        metavar="HOST",
        help="a host /admin/decode may add engines on: an address, a network (10.0.0.0/8), a host name or "
        ".domain (repeat; default: only the hosts of the --prefill/--decode URLs)",
    )
    p.add_argument(
        "--public-health-metrics",
        dest="public_health_metrics",
        action="store_const",
        const=True,
        default=None,
        help="with --api-key: serve /health and /metrics without the key (default: they need it)",
    )
    p.add_argument(
        "--allow-public-host",
        dest="allow_public_host",
        action="store_const",
        const=True,
        default=None,
        help="allow --host to be 0.0.0.0 or :: (listen on every interface; default: refused)",
    )
    p.set_defaults(func=run)


def _checked(dest: str, kind: Any) -> Any:
    """The flag's type with its range from `ServeConfig.RANGES` checked at parse time."""
    if dest in RANGES:
        low, high, is_low_open = RANGES[dest]
        if kind is int:
            return int_in(int(low), int(high))
        return float_in(low, high, is_low_open=is_low_open)
    return nonempty_text if kind is str else kind


def load_config(args: argparse.Namespace) -> Any:
    from eldr.proxy.config import build_config, read_yaml

    file_values = read_yaml(args.config) if args.config else {}
    flags = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS}
    flags.update(
        prefill=args.prefill,
        decode=args.decode,
        models=args.models,
        allow_public_host=args.allow_public_host,
        admin_engine_hosts=args.admin_engine_hosts,
        public_health_metrics=args.public_health_metrics,
    )
    return build_config(file_values, flags)


FD_RESERVE = 64  # open files beyond the connections: listening socket, logs, the loop's own


def fit_to_open_files(config: Any) -> Any:
    """Raise the open-files limit to what `max_connections` client connections and one upstream
    connection per admitted request need; where the hard limit is lower, lower `max_connections`
    (with a warning) rather than fail on accept under load."""
    engines = len(config.prefill) + len(config.decode)
    needed = config.max_connections + config.max_concurrency + 2 * engines + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, soft - config.max_concurrency - 2 * engines - FD_RESERVE)
        logging.getLogger("eldr.proxy").warning(
            "the open-files limit (%d) holds %d client connections, not max_connections %d: lowered",
            soft,
            fitted,
            config.max_connections,
        )
        return config.replace(max_connections=fitted)
    return config


def run(args: argparse.Namespace) -> int:
    try:
        from eldr.proxy.app import build_app, server_for
    except ImportError as exc:
        raise ConfigError(f"eldr serve needs the serve extra (pip install 'eldr[serve]'): {exc}") from exc
    from eldr.partition import Partition

    config = load_config(args)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = fit_to_open_files(config)
    uses_partition = config.policy in ("eldr", FEWEST_NEW_EXPERTS)  # fewest-new-experts: for its top_k
    partition = Partition.load(config.partition) if config.partition and uses_partition else None
    server = server_for(build_app(config, partition))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(server.serve(config.host, config.port))
    return 0
