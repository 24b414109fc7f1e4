"""Federation: a hub's view over regional brains (docs/scaling.md "Federation").

Internal. ``client`` fetches from the peers (each call under its own
deadline, all of a request's calls in one nursery), ``cache`` keeps their
answers briefly, ``merge`` puts the regions' pages together by time
(sans-IO). The routes are in brain/http/federation_api.py (the hub's) and
brain/http/federation_peer_api.py (what a region serves a hub).
"""
