"""A WebSocket client on Python's `websockets` package, written independently
of the server's Rust stack. The ws-edge compliance test runs it against a
live server and checks what it prints (one JSON object).

Usage: python3 ws_client.py ws://127.0.0.1:PORT/v1/ws
"""

import asyncio
import json
import sys

import websockets


async def main(url):
    out = {}
    async with websockets.connect(url, subprotocols=["rt.v1.json"]) as ws:
        out["subprotocol"] = ws.subprotocol
        await ws.send(json.dumps({"op": "subscribe", "topic": "py", "ref": "s"}))
        out["subscribe_ack"] = json.loads(await ws.recv())
        for i in range(3):
            frame = {"op": "publish", "topic": "py", "data": {"i": i}, "ref": f"p{i}"}
            await ws.send(json.dumps(frame))
        frames = [json.loads(await ws.recv()) for _ in range(6)]
        out["acks"] = sorted(f["seq"] for f in frames if f["op"] == "ack")
        out["events"] = [(f["seq"], f["data"]["i"]) for f in frames if f["op"] == "event"]
        # One text message sent as several fragments.
        await ws.send(iter(['{"op":"ping",', '"ref":', '"fragmented"}']))
        out["fragmented"] = json.loads(await ws.recv())
        await ws.send(b"\x00\x01")
        out["binary"] = json.loads(await ws.recv())
        await ws.close(1000, "done")
        out["close_code"] = ws.close_code
    print(json.dumps(out))


asyncio.run(main(sys.argv[1]))
