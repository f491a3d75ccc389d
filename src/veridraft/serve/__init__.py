"""`veridraft serve`: an OpenAI-compatible HTTP server over the library, with vLLM-named metrics.

Importing this package is cheap: the web stack (FastAPI, uvicorn) and torch are imported by the
modules that need them (`app`, `engine`), so `veridraft --help` stays light.
"""
