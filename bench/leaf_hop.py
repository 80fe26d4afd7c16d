"""What an activation hop costs across a leaf-node link, on loopback.

    python -m bench.leaf_hop                 # ~10 s: 1 KiB, 18 KiB and 576 KiB payloads
    python -m bench.leaf_hop --rounds 5000

Starts a hub nats-server (JetStream domain ``hub``) and a leaf server (domain ``leaf``) joined by a
leaf-node link, as a two-site deployment does (configs in a temp folder, servers stopped at the end).
A responder subscribed at the hub answers every message with 8 bytes; a requester sends payloads the
size of a stage's activations (one SmolLM2 decode row in bf16: 576 x 2 bytes plus the wire header;
16 decode rows; a 512-token prefill chunk) and times each round trip, first from a client of the hub
(no link) and from a client of the leaf (over the link both ways), alternating. Both clients live in this
process (one event loop, like a stage's NATS traffic). Prints p50/p99 per size and what the link
adds per crossing: (leaf p50 - hub p50) / 2.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats

from parallax.broker.server import EmbeddedServer, ServerConfig, free_port

SIZES = {"decode row (1.2 KiB)": 1_250, "16 decode rows (18 KiB)": 18_600, "prefill chunk (576 KiB)": 590_000}
SUBJECT = "bench.hop"


def start(folder: Path, name: str, body: str) -> EmbeddedServer:
    conf = folder / f"{name}.conf"
    conf.write_text(f"server_name: {name}\n{body}")
    return EmbeddedServer(ServerConfig(port=free_port(), jetstream=False, extra_args=("-c", str(conf)))).start()


async def round_trip(nc, payload: bytes) -> float:
    started = time.perf_counter()
    await nc.request(SUBJECT, payload, timeout=5)
    return (time.perf_counter() - started) * 1000


async def round_trips(hub_client, leaf_client, payload: bytes, rounds: int) -> tuple[list[float], list[float]]:
    """Round trips from the hub's client and the leaf's, alternating (a noisy machine slows both alike)."""
    for _ in range(100):  # the responder's interest crosses the link a moment after it subscribed
        try:
            await leaf_client.request(SUBJECT, b"", timeout=5)
            break
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.1)
    for _ in range(min(50, rounds)):  # warm-up: interest propagated over the link, buffers grown
        await round_trip(hub_client, payload)
        await round_trip(leaf_client, payload)
    direct, linked = [], []
    for _ in range(rounds):
        direct.append(await round_trip(hub_client, payload))
        linked.append(await round_trip(leaf_client, payload))
    return sorted(direct), sorted(linked)


def p(times: list[float], q: float) -> float:
    return times[min(len(times) - 1, int(q * len(times)))]


async def measure(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="parallax-leaf-hop-") as tmp:
        folder, link = Path(tmp), free_port()
        hub = start(folder, "hub", f'jetstream {{ domain: hub, store_dir: "{folder}/hub" }}\n'
                                   f'leafnodes {{ listen: "127.0.0.1:{link}" }}\n')
        try:
            leaf = start(folder, "leaf", f'jetstream {{ domain: leaf, store_dir: "{folder}/leaf" }}\n'
                                         f'leafnodes {{ remotes: [ {{ url: "nats://127.0.0.1:{link}" }} ] }}\n')
            try:
                await compare(hub.url, leaf.url, rounds)
            finally:
                leaf.stop()
        finally:
            hub.stop()


async def compare(hub_url: str, leaf_url: str, rounds: int) -> None:
    responder = await nats.connect(hub_url)
    hub_client, leaf_client = await nats.connect(hub_url), await nats.connect(leaf_url)
    try:
        async def ack(msg) -> None:
            await msg.respond(b"ack12345")

        await responder.subscribe(SUBJECT, cb=ack)
        await responder.flush()
        print(f"{'payload':26} {'hub p50':>8} {'hub p99':>8} {'leaf p50':>9} {'leaf p99':>9} {'link/crossing':>14}  (ms)")
        for label, size in SIZES.items():
            payload = bytes(size)
            n = rounds if size < 100_000 else max(50, rounds // 10)
            direct, linked = await round_trips(hub_client, leaf_client, payload, n)
            added = (statistics.median(linked) - statistics.median(direct)) / 2
            print(f"{label:26} {p(direct, .5):8.3f} {p(direct, .99):8.3f} {p(linked, .5):9.3f} {p(linked, .99):9.3f} "
                  f"{added:14.3f}")
    finally:
        for nc in (responder, hub_client, leaf_client):
            await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.leaf_hop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000, help="round trips per small payload (a tenth for the large one)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    asyncio.run(measure(args.rounds))


if __name__ == "__main__":
    main()
