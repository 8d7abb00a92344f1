"""`imcap serve`: a REST API and a web page over one batching model worker.

    settings.py  ServeSettings: every limit, checked in one place
    uploads.py   a caption request read from its multipart form: options, files, decoded images
    queue.py     Batcher: a bounded queue, shared model calls in one worker thread
    app.py       create_app(captioners, settings) -> FastAPI (REST API, /health, offline docs)
    ui.py        the Gradio page at /, on the same Batcher
    server.py    serve(models, settings): load the models once and run uvicorn

The serving dependencies are an extra: `pip install 'imcap[serve]'`. Import the modules themselves.
"""
