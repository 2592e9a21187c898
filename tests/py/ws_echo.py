"""A WebSocket echo server and client (the `websockets` library).

  python ws_echo.py server PORT
  python ws_echo.py client ws://HOST:PORT/path   # exits 0 when the echo round-trips
"""
import asyncio
import sys

import websockets


async def echo(ws):
    async for msg in ws:
        await ws.send(msg)


async def serve(port):
    async with websockets.serve(echo, "127.0.0.1", int(port)):
        print("ready", flush=True)
        await asyncio.Future()


async def client(url):
    async with websockets.connect(url, open_timeout=10) as ws:
        for msg in ["hello", "x" * 100000, b"\x00\x01binary"]:
            await ws.send(msg)
            got = await asyncio.wait_for(ws.recv(), 10)
            if got != msg:
                print("FAILED: echo mismatch", file=sys.stderr)
                sys.exit(1)
    print("ok")


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[2]) if sys.argv[1] == "server" else client(sys.argv[2]))
