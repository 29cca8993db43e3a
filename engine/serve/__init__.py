"""`auraflow-edge serve`: the HTTP server (OpenAI Images API, A1111 API, a page) and its Ray Serve deployment."""
