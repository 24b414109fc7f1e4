"""The brain's HTTP port and the application behind it (internal).

``server`` runs hypercorn and hands WebSocket upgrades to ``websocket``;
``api``, ``auth``, ``openapi``, ``resources`` and ``dashboard_page`` are the
application: routes, who may call them, and the JSON they speak.
"""
