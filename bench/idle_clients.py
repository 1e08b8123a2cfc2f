#!/usr/bin/env python3
"""Opens N keep-alive connections to 127.0.0.1:PORT, sends one GET on
each and reads its answer, prints "ready N" once all are open and idle,
then holds them until stdin closes (or HOLD seconds pass).

    idle_clients.py PORT N [HOLD=60]
"""
import asyncio
import sys


async def one(port, opened, failures, gate):
    async with gate:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await asyncio.wait_for(reader.readexactly(length), 10)
            opened.append(writer)
        except Exception:  # counted, reported by the caller
            failures.append(1)


async def main():
    port, count = int(sys.argv[1]), int(sys.argv[2])
    hold = float(sys.argv[3]) if len(sys.argv) > 3 else 60
    opened, failures = [], []
    gate = asyncio.Semaphore(200)
    await asyncio.gather(*(one(port, opened, failures, gate) for _ in range(count)))
    print(f"ready {len(opened)} failed {len(failures)}", flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    await asyncio.wait([stdin_closed], timeout=hold)
    for writer in opened:
        writer.close()


asyncio.run(main())
