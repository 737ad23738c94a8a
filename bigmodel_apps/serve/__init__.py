"""``bigmodel serve``: an OpenAI-compatible HTTP server with continuous batching.

* ``engine``: the fixed-slot continuous-batching scheduler over the model's own cached forward;
* ``model``: what is served (a run or an HF directory, its tokenizer and chat template);
* ``app``: the FastAPI app (completions, chat, streaming, models, health, metrics).

Needs the ``deploy`` extra (fastapi, uvicorn, jinja2, prometheus-client).
"""
