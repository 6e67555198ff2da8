"""The ``baton`` command.

baton up                         start embedded NATS and the three services
baton submit WORKFLOW INPUT ...  publish a task, print its events until it ends
baton nats                       run only the embedded nats-server
baton model tiny DIR             build the no-download tiny model
baton asyncapi [--check]         write (or check) proto/asyncapi.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

from baton.settings import DEFAULT_NATS_URL


def _submit(args: argparse.Namespace) -> int:
    from baton.submit import submit

    task_id = args.task_id or uuid.uuid4().hex
    return asyncio.run(
        submit(
            args.nats_url,
            args.workflow,
            args.input,
            tenant=args.tenant,
            session=args.session,
            task_id=task_id,
            max_tokens=args.max_tokens,
            timeout=args.timeout,
        )
    )


def _up(args: argparse.Namespace) -> int:
    from baton.stack import Stack

    return Stack(
        data_dir=Path(args.data_dir),
        engine=args.engine,
        nats_url=args.nats_url_given,
        nats_port=args.nats_port,
        monitor_port=args.monitor_port,
        http_port=args.http_port,
    ).run_forever()


def _nats(args: argparse.Namespace) -> int:
    from baton.natsd import NatsServer

    server = NatsServer(Path(args.data_dir) / "nats", port=args.port, monitor_port=8222).start()
    print(f"nats-server at {server.url} (store {server.store_dir}); Ctrl-C to stop", flush=True)
    try:
        assert server.proc is not None
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


def _model(args: argparse.Namespace) -> int:
    from baton.tinymodel import build_tiny_model

    path = build_tiny_model(Path(args.dir))
    print(f"tiny model ready in {path}")
    return 0


def _asyncapi(args: argparse.Namespace) -> int:
    from proto.asyncapi import DOCUMENT_PATH, render

    text = render()
    if args.check:
        if DOCUMENT_PATH.read_text() != text:
            print(f"{DOCUMENT_PATH} is out of date: run `baton asyncapi`", file=sys.stderr)
            return 1
        print(f"{DOCUMENT_PATH} matches the types")
        return 0
    DOCUMENT_PATH.write_text(text)
    print(f"wrote {DOCUMENT_PATH}")
    return 0


def parser() -> argparse.ArgumentParser:
    import os

    env_url = os.environ.get("BATON_NATS_URL") or os.environ.get("NATS_URL")
    p = argparse.ArgumentParser(
        prog="baton", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start embedded NATS and all services")
    up.add_argument("--data-dir", default=os.environ.get("BATON_DATA_DIR", ".data"))
    up.add_argument(
        "--engine",
        default=os.environ.get("ENGINE") or os.environ.get("BATON_ENGINE", "vllm"),
        choices=["vllm", "openai", "sim"],
    )
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument("--monitor-port", type=int, default=8222)
    up.add_argument("--http-port", type=int, default=8080)
    up.set_defaults(fn=_up, nats_url_given=env_url)

    s = sub.add_parser("submit", help="publish a task and follow its events")
    s.add_argument("workflow")
    s.add_argument("input")
    s.add_argument("--tenant", required=True)
    s.add_argument("--session")
    s.add_argument("--task-id")
    s.add_argument("--max-tokens", type=int)
    s.add_argument("--timeout", type=float, default=300.0)
    s.add_argument("--nats-url", default=env_url or DEFAULT_NATS_URL)
    s.set_defaults(fn=_submit)

    n = sub.add_parser("nats", help="run only the embedded nats-server")
    n.add_argument("--data-dir", default=".data")
    n.add_argument("--port", type=int, default=4222)
    n.set_defaults(fn=_nats)

    mdl = sub.add_parser("model", help="model utilities")
    msub = mdl.add_subparsers(dest="model_cmd", required=True)
    tiny = msub.add_parser("tiny", help="build the tiny random-weight model into DIR")
    tiny.add_argument("dir")
    tiny.set_defaults(fn=_model)

    a = sub.add_parser("asyncapi", help="write or check proto/asyncapi.yaml")
    a.add_argument("--check", action="store_true")
    a.set_defaults(fn=_asyncapi)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
