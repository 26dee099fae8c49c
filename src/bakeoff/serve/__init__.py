"""Serve what was trained: an HTTP endpoint with the SageMaker inference contract, endpoint
latency measured the way the study did, and exports to ONNX / TorchScript.

Needs ``pip install 'bakeoff[serve]'`` (FastAPI, uvicorn, httpx, ONNX Runtime); importing this
package does not.
"""

from bakeoff.serve.endpoint_latency import measure_endpoint_latency
from bakeoff.serve.export import export_model
from bakeoff.serve.predictor import load_predictor

__all__ = ["load_predictor", "measure_endpoint_latency", "export_model"]
