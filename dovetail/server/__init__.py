"""dovetail-launch serve: an OpenAI-compatible HTTP server in front of one Coordinator.

    errors.py   the OpenAI error envelope and the status of each failure
    schema.py   request bodies: what is honoured, what is refused (never silently dropped)
    engine.py   the bridge from asyncio to the coordinator's request threads
    metrics.py  Prometheus metrics under vLLM's names
    app.py      the Starlette routes, keys, CORS
    cli.py      the command: flags, start-up in the background, uvicorn
"""
