"""The normcore job service: FastAPI app, settings, store, auth, client CLI."""
