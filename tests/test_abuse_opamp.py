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
from test_opamp_http import UID, api, full_report, opamp_token, post, ready_brain, reply_of

from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.testing.abuse import assert_served, health_live, watching
from z4j.testing.agents import admin_token
from z4j.testing.brain import make_config

MIB = 1024 * 1024
GZIP = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}


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
    """Bodies small on the wire and costly inside: a gzip bomb and a gzipped
    million attributes; and once, the million attributes uncompressed. The
    wire's own cost (a Python HTTP server reading megabytes) is not what
    this measures, nor a well-formed report near the 10 MiB limit: each
    protobuf or SQLite step over one holds the GIL for 5 to 20 ms
    (docs/opamp.md, Limits), which a loaded machine can add up to a late
    probe; the test below shows such reports are served."""
    config = make_config(tmp_path / "data")
    limit = config.opamp_max_message_bytes
    token = await opamp_token(config, "p")
    plain_crowd = crowded(limit - MIB)
    bomb_over = gzip.compress(b"\x00" * (6 * limit), compresslevel=9)
    bomb_crowd = gzip.compress(plain_crowd, compresslevel=9)
    attackers, rounds = 3, 2
    with trio.fail_after(120):
        async with ready_brain(config) as brain:
            http = brain.addresses.http

            async def attacker(n: int) -> None:
                if n == 0:
                    refused = reply_of(await post(http, plain_crowd, token)).error_response
                    assert refused.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST
                for _ in range(rounds):
                    assert (await post(http, bomb_over, token, GZIP)).status == 413
                    refused = reply_of(await post(http, bomb_crowd, token, GZIP)).error_response
                    assert refused.type == pb.ServerErrorResponse.TYPE_BAD_REQUEST

            async with watching({"health": health_live(http)}) as times:
                async with trio.open_nursery() as nursery:
                    for n in range(attackers):
                        nursery.start_soon(attacker, n)
            rejected = brain.stats.opamp_rejected
            assert rejected["too_many_elements"] == attackers * rounds + 1
            assert rejected["too_large"] == attackers * rounds
    assert_served(times)


async def test_a_large_well_formed_report_is_stored(tmp_path: Path) -> None:
    """Near the limit, gzipped or not, a well-formed report takes the heavy
    path (a worker thread, one at a time) and is stored whole."""
    config = make_config(tmp_path / "data")
    limit = config.opamp_max_message_bytes
    token = await opamp_token(config, "p")
    plain = large_config(limit - MIB, 0)
    with trio.fail_after(120):
        async with ready_brain(config) as brain:
            http = brain.addresses.http
            assert not reply_of(await post(http, plain, token)).HasField("error_response")
            again = gzip.compress(large_config(limit - MIB, 1), compresslevel=9)
            assert not reply_of(await post(http, again, token, GZIP)).HasField("error_response")
            status, body = await api(http, f"/opamp/agents/{UID.hex()}", await admin_token(config))
            assert status == 200, body
            assert "big.yaml" in str(body["effective_config"])
