"""Agent protocol v2 (wire-compatible with z4j agents), sans-IO.

`connection.AgentProtocol` is the state machine of one connection for either
role; `frames` holds the frame values; `signing` and `replay` the checks.
"""
