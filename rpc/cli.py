"""hostagent-client: call one verb and print its result as JSON.

    hostagent-client [--dev DIR | --host H --port P --ca F --cert F --key F]
                     [--wait] VERB [name=value ...]

Each value is parsed as JSON when it parses, else taken as a string. With
--wait, a verb that returns a jobUUID is followed to its end with a
progress bar on stderr. A failed call prints the error and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from rpc.client import Client, RpcError

DEFAULT_PKI = Path("/etc/pki/hostagent")


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"hostagent-client: expected name=value, got {item!r}")
        params[name] = parse_value(value)
    return params


def make_client(args: argparse.Namespace) -> Client:
    if args.dev is not None:
        return Client.for_dev(args.dev, port=args.port or 54321, host=args.host or "127.0.0.1")
    pki = DEFAULT_PKI
    return Client.from_files(args.host or "127.0.0.1", args.port or 54321,
                             args.ca or pki / "ca.pem", args.cert or pki / "client.pem",
                             args.key or pki / "client.key")


class ProgressBar:
    def __init__(self, stream: Any = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.last = ""

    def __call__(self, info: dict[str, Any]) -> None:
        pct = int(info.get("progress") or 0)
        filled = self.width * pct // 100
        line = f"[{'#' * filled}{' ' * (self.width - filled)}] {pct:3d}% {info.get('status')}"
        if line == self.last:
            return
        # On a terminal the line is redrawn in place: blank what a longer
        # line before left (else "running" then "done" shows "doneing").
        pad = " " * max(0, len(self.last) - len(line))
        self.last = line
        self.stream.write(f"\r{line}{pad}\r{line}" if self.tty else line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")


async def is_job(client: Client, verb: str) -> bool | None:
    """Whether the agent runs `verb` as a job (rpc.discover tags it "job");
    None if it does not know the verb."""
    doc = await client.call("rpc.discover")
    for method in doc.get("methods", ()):
        if method.get("name") == verb:
            return any(t.get("name") == "job" for t in method.get("tags", ()))
    return None


async def run(args: argparse.Namespace) -> int:
    params = parse_params(args.params)
    try:
        client = make_client(args)
    except OSError as e:
        hint = (f" (an agent started with --dev --state-dir {args.dev} makes it on its first "
                "start)" if args.dev is not None else "")
        print(f"hostagent-client: cannot read {e.filename}: {e.strerror}{hint}",
              file=sys.stderr)
        return 2
    async with client:
        try:
            if args.wait and await is_job(client, args.verb) is False:
                print(f"hostagent-client: --wait follows jobs, and {args.verb} is not one "
                      "(it answers at once): run it without --wait", file=sys.stderr)
                return 2
            if args.wait and "jobUUID" not in params:
                params["jobUUID"] = str(uuid.uuid4())
            result = await client.call(args.verb, **params)
            if args.wait and isinstance(result, dict) and "jobUUID" in result:
                bar = ProgressBar()
                info = await client.wait_job(result["jobUUID"], progress=bar,
                                             timeout=args.timeout)
                bar.done()
                print(json.dumps(info, indent=2))
                return 0 if info["status"] == "done" else 1
        except RpcError as e:
            print(json.dumps({"error": e.to_dict()}, indent=2), file=sys.stderr)
            return 1
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            print(f"hostagent-client: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostagent-client", description=__doc__.split("\n")[0])
    p.add_argument("--dev", metavar="DIR", default=os.environ.get("HOSTAGENT_DEV"),
                   help="use the dev certificates of an agent started with --dev --state-dir DIR")
    p.add_argument("--host", help="agent address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="agent port (default 54321)")
    p.add_argument("--ca", help=f"CA certificate (default {DEFAULT_PKI}/ca.pem)")
    p.add_argument("--cert", help=f"client certificate (default {DEFAULT_PKI}/client.pem)")
    p.add_argument("--key", help=f"client key (default {DEFAULT_PKI}/client.key)")
    p.add_argument("--wait", action="store_true", help="follow a job until it ends")
    p.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    p.add_argument("verb")
    p.add_argument("params", nargs="*", metavar="name=value")
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
