"""OpAMP's HTTP transport under abuse: one agent's crowded or compressed
10 MiB must not hold up anyone else's answers.

A body over HEAVY_BYTES, or gzipped, is inflated, parsed and folded on a
worker thread (z4j/brain/http/opamp.py), and a message with more than
MAX_ELEMENTS repeated elements is refused after the parse, before anything
reads them (z4j/protocol/opamp/codec.py). Without the first, the health
probe below waits through every parse (hundreds of milliseconds each);
without the second, a million attributes become a million Python objects.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import trio
from test_opamp_http import UID, full_report, opamp_token, post, ready_brain, reply_of

from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.testing.abuse import assert_served, health_live, watching
from z4j.testing.brain import make_config

MIB = 1024 * 1024


def crowded(size: int) -> bytes:
    """An AgentToServer of about ``size`` bytes of one-letter attributes."""
    message = pb.AgentToServer(instance_uid=UID)
    attribute = pb.KeyValue(key="k", value=pb.AnyValue(string_value="v"))
    each = attribute.ByteSize() + 2  # its tag and length in the list
    message.agent_description.non_identifying_attributes.extend([attribute] * (size // each))
    data = message.SerializeToString()
    assert len(data) <= size + 64
    return data


def large_config(size: int, seq: int) -> bytes:
    """A well-formed report whose effective configuration is one ``size``-byte file."""
    message = full_report(seq=seq)
    message.effective_config.config_map.config_map["big.yaml"].body = b"x" * size
    return message.SerializeToString()


async def test_crowded_and_compressed_bodies_do_not_stall_other_clients(tmp_path: Path) -> None:
    """Bodies small on the wire and costly inside: a gzip bomb, a gzipped
    million attributes, a gzipped 2 MiB configuration (well-formed: stored,
    on the heavy path); and once, the million attributes uncompressed. The
    wire's own cost (a Python HTTP server reading megabytes) is not what
    this measures, nor a well-formed report near the 10 MiB limit: each
    protobuf or SQLite step over such a report holds the GIL for 5 to 20 ms
    (docs/opamp.md, Limits), which a loaded machine can add up to a late
    probe."""
    config = make_config(tmp_path / "data")
    limit = config.opamp_max_message_bytes
    token = await opamp_token(config, "p")
    gz = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
    plain_crowd = crowded(limit - MIB)
    bomb_over = gzip.compress(b"\x00" * (6 * limit), compresslevel=9)
    bomb_crowd = gzip.compress(plain_crowd, compresslevel=9)
    attackers, rounds = 3, 2
    # Made before the watch: this test's own client shares the brain's loop.
    large = {
        (n, i): gzip.compress(large_config(2 * MIB, 10 * n + i), compresslevel=9)
        for n in range(attackers)
        for i in range(rounds)
    }
    with trio.fail_after(120):
        async with ready_brain(config) as brain:
            http = brain.addresses.http
            accepted: list[int] = []

            async def attacker(n: int) -> None:
                if n == 0:
                    refused = reply_of(await post(http, plain_crowd, token)).error_response
                    assert refused.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
                for i in range(rounds):
                    assert (await post(http, bomb_over, token, gz)).status == 413
                    refused = reply_of(await post(http, bomb_crowd, token, gz)).error_response
                    assert refused.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
                    # Well-formed and large: stored, folded on a thread.
                    reply = await post(http, large[n, i], token, gz)
                    assert not reply_of(reply).HasField("error_response")
                    accepted.append(n)

            async with watching({"health": health_live(http)}) as times:
                async with trio.open_nursery() as nursery:
                    for n in range(attackers):
                        nursery.start_soon(attacker, n)
            rejected = brain.stats.opamp_rejected
            assert rejected["too_many_elements"] == attackers * rounds + 1
            assert rejected["too_large"] == attackers * rounds
            assert len(accepted) == attackers * rounds
    assert_served(times)
