"""Serving on this machine: endpoints (router + model host processes) and batch transform.

    backend.py    ServingBackend protocol, LocalServingBackend, get_serving_backend(settings)
    host.py       the model host process: SageMaker container routes, micro-batched forward
    router.py     the endpoint's stable address; switches hosts for blue/green deploys
    batcher.py    dynamic micro-batching on one model thread
    batch.py      batch transform in-process, resumable, SageMaker's output layout
    model_dir.py  fetch, pack and version model directories (docs/CONTRACTS.md)
    httpio.py     body limits and SageMaker-shaped errors shared by host and router

The handlers themselves are ``sm_scripts/inference.py``, the same file SageMaker would run.
"""
