"""Triton python backend model for a cm-deploy export (`cm-deploy serve-repo` copies this file to
<model>/1/model.py). It serves the export's ONNX graph through cm_deploy.runtime (ONNX Runtime, with
the CoupledScan op library when the repository carries one), on the instance's GPU (CUDA provider,
onnxruntime-gpu) or on the CPU, as the instance group says. The batching itself lives in
cm_deploy.serving.batching, so that this file stays a thin adapter.

Config parameters (written by serve-repo): mode (whole | stream), model_file, op_library (beside the
model folder's config.pbtxt), intra_op_threads, sequence_idle_seconds.

The backend's embedded interpreter ignores PYTHONPATH: folders listed in $CM_DEPLOY_PYTHONPATH
(os.pathsep-separated) are put in front of sys.path before anything else is imported.
"""
import json
import os
import site
import sys


def _add_paths():
    extra = [p for p in os.environ.get("CM_DEPLOY_PYTHONPATH", "").split(os.pathsep) if p]
    before = list(sys.path)
    for p in reversed(extra):
        site.addsitedir(p)          # also reads the folder's .pth files (editable installs)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


_add_paths()

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from pathlib import Path

        from cm_deploy.runtime.ort_backend import OrtBackend
        from cm_deploy.serving.batching import StreamRunner, WholeSequenceRunner

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"])
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
        lib = params.get("op_library")
        threads = int(params["intra_op_threads"]) if params.get("intra_op_threads") else None
        self.backend = OrtBackend(folder / args["model_version"] / params["model_file"], device=device,
                                  threads=threads, ort_ops=str(folder / lib) if lib else None)
        self.stream = params.get("mode") == "stream"
        if self.stream:
            idle = float(params["sequence_idle_seconds"]) if params.get("sequence_idle_seconds") else None
            self.runner = StreamRunner(self.backend, idle_seconds=idle)
            self.inputs = self.runner.chunk_inputs
        else:
            self.runner = WholeSequenceRunner(self.backend)
            self.inputs = self.runner.inputs
        self.outputs = [o["name"] for o in config["output"]]
        pb_utils.Logger.log_info(f"{args['model_name']}: {self.backend.name} on {device}")

    def _feeds(self, request):
        feeds = {}
        for name in self.inputs:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is not None:
                feeds[name] = t.as_numpy()
        return feeds

    @staticmethod
    def _flag(request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return t.as_numpy().reshape(-1)[0] if t is not None else 0

    def execute(self, requests):
        if self.stream:
            items = [(int(self._flag(r, "CORRID")), bool(self._flag(r, "START")), bool(self._flag(r, "END")),
                      self._feeds(r)) for r in requests]
            results = self.runner.run(items)
        else:
            results = self.runner.run([self._feeds(r) for r in requests])
        responses = []
        for res in results:
            if isinstance(res, str):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(res)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(res[n])) for n in self.outputs]))
        return responses

    def finalize(self):
        self.backend.close()
