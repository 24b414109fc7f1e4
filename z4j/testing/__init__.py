"""Reusable test helpers: a throwaway Postgres cluster, brain runners, checkers.

They live in the package (as trio's own ``trio.testing`` does) so the test
suite, the benchmarks, the conformance suite and users share them. Every
public name is re-exported here; the modules named for what they hold
(``z4j.testing.brain``, ``.agents``, ``.http``, ...) stay importable.
"""

from .abuse import SERVED_WITHIN as SERVED_WITHIN
from .abuse import Probe as Probe
from .abuse import assert_served as assert_served
from .abuse import health_live as health_live
from .abuse import ingest_ping as ingest_ping
from .abuse import watch as watch
from .abuse import watching as watching
from .agents import RawAgent as RawAgent
from .agents import admin_token as admin_token
from .agents import provision as provision
from .agents import raw_agent as raw_agent
from .brain import BrainProcess as BrainProcess
from .brain import RunningBrain as RunningBrain
from .brain import buffer_rows as buffer_rows
from .brain import make_config as make_config
from .brain import read_events as read_events
from .brain import run_z4j as run_z4j
from .brain import running_brain as running_brain
from .brain import wait_until as wait_until
from .cancel import CancelAtStep as CancelAtStep
from .drain import draining as draining
from .event_search import StoredEvent as StoredEvent
from .event_search import body_contains as body_contains
from .event_search import seed_events as seed_events
from .event_search import stored_events as stored_events
from .http import HttpReply as HttpReply
from .http import http_get as http_get
from .http import http_request as http_request
from .http import read_until_closed as read_until_closed
from .opamp import OpampClosed as OpampClosed
from .opamp import OpampRejected as OpampRejected
from .opamp import OpampSocket as OpampSocket
from .opamp import opamp_socket as opamp_socket
from .opamp import opamp_token as opamp_token
from .postgres import ExternalPostgres as ExternalPostgres
from .postgres import PostgresCluster as PostgresCluster
from .postgres import find_pg_bin as find_pg_bin
from .schedules import answer_activation as answer_activation
from .schedules import control_event as control_event
from .schedules import publish_events as publish_events
from .schedules import schedule_row as schedule_row
from .schedules import snapshot_events as snapshot_events
from .store import json_of as json_of
from .store import open_store as open_store
from .store import query as query

__all__ = [
    "SERVED_WITHIN",
    "BrainProcess",
    "CancelAtStep",
    "ExternalPostgres",
    "HttpReply",
    "OpampClosed",
    "OpampRejected",
    "OpampSocket",
    "PostgresCluster",
    "Probe",
    "RawAgent",
    "RunningBrain",
    "StoredEvent",
    "admin_token",
    "answer_activation",
    "assert_served",
    "body_contains",
    "buffer_rows",
    "control_event",
    "draining",
    "find_pg_bin",
    "health_live",
    "http_get",
    "http_request",
    "ingest_ping",
    "json_of",
    "make_config",
    "opamp_socket",
    "opamp_token",
    "open_store",
    "provision",
    "publish_events",
    "query",
    "raw_agent",
    "read_events",
    "read_until_closed",
    "run_z4j",
    "running_brain",
    "schedule_row",
    "seed_events",
    "snapshot_events",
    "stored_events",
    "wait_until",
    "watch",
    "watching",
]
