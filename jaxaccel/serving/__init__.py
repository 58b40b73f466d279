"""An OpenAI-compatible server on the generation engine (`jaxaccel serve`) and the same
endpoints over a batch file without HTTP (`jaxaccel run-batch`).

Modules, one concept each: `protocol` (request bodies, the error object), `chat` (chat
templates), `text` (one choice's deltas), `engine_loop` (the engine on its own thread),
`metrics` (Prometheus), `server` (the endpoints' logic, no HTTP), `app` (FastAPI + uvicorn),
`batch` (OpenAI's batch file format), `load` (checkpoint -> server).
"""
