"""Serving with NVIDIA Triton Inference Server (docs/serving.md).

    repository.py    cm-deploy serve-repo: a model repository from an export (config.pbtxt from
                     Triton's ModelConfig schema; needs tritonclient: pip install 'cm-deploy[serve]')
    triton_model.py  the python backend's model.py (copied into the repository)
    batching.py      how that model runs the requests Triton batches (padding, per-sequence state)
    stream_graph.py  the streaming graph with START/READY for Triton's implicit state (needs onnx)
    server.py        a local tritonserver on loopback (tests, benchmarks)

Nothing here is imported by cm_deploy.runtime or by the CLI until serve-repo runs.
"""
