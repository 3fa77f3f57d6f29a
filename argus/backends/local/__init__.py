"""The local backend: torchrun jobs with the PyTorchJob env contract (`launch`), the tool services as
supervised processes (`tools`), vLLM's CPU build as a process (`vllm`), and nginx as the stable serving
endpoint (`gateway`), behind `backend.LocalBackend`."""
