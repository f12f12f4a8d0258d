"""``lorakit serve``: an OpenAI-compatible server whose requests pick their adapter by the ``model`` field.

:mod:`lorakit.serve.engine` is the generation engine (continuous batching, mixed-adapter batches);
:mod:`lorakit.serve.kv_batch` the KV-cache surgery it relies on.
"""
