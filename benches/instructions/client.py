#!/usr/bin/env python3
"""Sends exactly N HTTP/1.1 requests over C keep-alive connections and checks each answer.

    client.py HOST:PORT N C METHOD PATH [BODY]

`{i}` in PATH or BODY is replaced by the request's number (0..N-1), so every request can
name a client of its own. Exits non-zero if any answer is not a 2xx or a connection breaks:
an instruction count over failed requests would measure the wrong path.
"""
import asyncio
import sys


async def connection(host, port, numbers, method, path, body, failures):
    reader, writer = await asyncio.open_connection(host, port)
    for i in numbers:
        target = path.replace("{i}", str(i))
        payload = body.replace("{i}", str(i)).encode() if body is not None else b""
        head = f"{method} {target} HTTP/1.1\r\nHost: gitlab.example.com\r\n"
        if body is not None:
            head += "Content-Type: application/x-www-form-urlencoded\r\n"
            head += f"Content-Length: {len(payload)}\r\n"
        writer.write(head.encode() + b"\r\n" + payload)
        status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        await reader.readexactly(length)
        status = status_line.split(b" ")[1:2]
        if not status or not status[0].startswith(b"2"):
            failures.append(status_line)
    writer.close()


async def main():
    address, n, c, method, path = sys.argv[1:6]
    body = sys.argv[6] if len(sys.argv) > 6 else None
    host, port = address.rsplit(":", 1)
    n, c = int(n), int(c)
    failures = []
    await asyncio.gather(*(
        connection(host, int(port), range(k, n, c), method, path, body, failures)
        for k in range(c)
    ))
    if failures:
        sys.exit(f"{len(failures)} of {n} answers were not 2xx, e.g. {failures[0]!r}")


asyncio.run(main())
