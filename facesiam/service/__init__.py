"""facesiam serve: face verification (1:1) and gallery search (1:N) over HTTP, with a web page.

app.py: the FastAPI app (endpoints, tokens, limits); batcher.py: requests that arrive together share one pass;
store.py: the gallery the service enrols into, saved atomically; page.html: the web page at /.
"""
