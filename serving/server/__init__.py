"""The builtin engine's OpenAI-compatible HTTP server (FastAPI + uvicorn): app.py builds the app, serve.py
runs one deployment. Nothing is re-exported here, so importing a submodule never imports the others."""
