"""``vramfit serve``: the pipeline as stage workers behind an OpenAI-compatible images API.

protocol (wire format) -> app (routes) -> engine (queues, scheduling, supervision) -> stages (the units and their
worker process). ``cli`` is the command; ``ray_app`` hosts the same stages as Ray Serve deployments.
"""
