"""OpAMP, sans-IO: the messages, their codec, and the per-agent rules.

- `opamp_pb2`: the messages, generated from our own ``opamp.proto``.
- `codec`: bytes to `AgentToServer` and `ServerToAgent` to bytes (size
  limit, gzip, the WebSocket header); `OpampDecodeError` for any fault.
- `state`: `receive`, one agent's state and one message in, the new state,
  the reply and what changed out.
- `remote_config`: a configuration, its hash and an agent's progress with it.
- `replies`: BAD_REQUEST and UNAVAILABLE answers.
- `flags`, `attributes`: the bit masks and attribute lists as Python values.

The HTTP and WebSocket endpoints, the store and rollouts build on these.
"""

from __future__ import annotations

from . import opamp_pb2 as opamp_pb2
from .attributes import AttributeValue as AttributeValue
from .attributes import from_python as from_python
from .attributes import key_values as key_values
from .attributes import to_dict as to_dict
from .attributes import to_python as to_python
from .codec import DEFAULT_MAX_MESSAGE_BYTES as DEFAULT_MAX_MESSAGE_BYTES
from .codec import INSTANCE_UID_BYTES as INSTANCE_UID_BYTES
from .codec import MAX_ELEMENTS as MAX_ELEMENTS
from .codec import MAX_FIELDS as MAX_FIELDS
from .codec import FieldCount as FieldCount
from .codec import MessageTooLarge as MessageTooLarge
from .codec import OpampDecodeError as OpampDecodeError
from .codec import check_size as check_size
from .codec import decode_agent_to_server as decode_agent_to_server
from .codec import decode_http_body as decode_http_body
from .codec import decode_ws_message as decode_ws_message
from .codec import encode_server_to_agent as encode_server_to_agent
from .codec import encode_ws_message as encode_ws_message
from .codec import inflate_gzip as inflate_gzip
from .codec import payload as payload
from .codec import ws_payload as ws_payload
from .flags import SERVER_CAPABILITIES as SERVER_CAPABILITIES
from .flags import AgentCapability as AgentCapability
from .flags import AgentFlag as AgentFlag
from .flags import ServerCapability as ServerCapability
from .flags import ServerFlag as ServerFlag
from .remote_config import ConfigFile as ConfigFile
from .remote_config import ConfigProgress as ConfigProgress
from .remote_config import RemoteConfig as RemoteConfig
from .remote_config import config_hash as config_hash
from .remote_config import progress as progress
from .replies import bad_request as bad_request
from .replies import retry_after_seconds as retry_after_seconds
from .replies import unavailable as unavailable
from .state import MAX_FULL_STATE_REQUESTS as MAX_FULL_STATE_REQUESTS
from .state import STATUS_PARTS as STATUS_PARTS
from .state import AgentState as AgentState
from .state import Change as Change
from .state import Outcome as Outcome
from .state import Transport as Transport
from .state import expected_parts as expected_parts
from .state import push as push
from .state import receive as receive

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INSTANCE_UID_BYTES",
    "MAX_ELEMENTS",
    "MAX_FIELDS",
    "MAX_FULL_STATE_REQUESTS",
    "SERVER_CAPABILITIES",
    "STATUS_PARTS",
    "AgentCapability",
    "AgentFlag",
    "AgentState",
    "AttributeValue",
    "Change",
    "ConfigFile",
    "ConfigProgress",
    "FieldCount",
    "MessageTooLarge",
    "OpampDecodeError",
    "Outcome",
    "RemoteConfig",
    "ServerCapability",
    "ServerFlag",
    "Transport",
    "bad_request",
    "check_size",
    "config_hash",
    "decode_agent_to_server",
    "decode_http_body",
    "decode_ws_message",
    "encode_server_to_agent",
    "encode_ws_message",
    "from_python",
    "inflate_gzip",
    "key_values",
    "opamp_pb2",
    "payload",
    "progress",
    "push",
    "receive",
    "retry_after_seconds",
    "to_dict",
    "to_python",
    "unavailable",
    "ws_payload",
]
