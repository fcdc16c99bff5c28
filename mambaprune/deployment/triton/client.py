"""Client helpers: requests to a served model with tritonclient (HTTP, KServe v2 protocol)."""
from __future__ import annotations

import numpy as np

from ...errors import MissingDependencyError
from .server import INSTALL_HINT


def http_client(url: str, timeout: float = 60.0):
    """A tritonclient.http.InferenceServerClient for `url` (http://host:port)."""
    try:
        import tritonclient.http as httpclient
    except ImportError as err:
        raise MissingDependencyError(f"requests to Triton need tritonclient: {INSTALL_HINT} ({err})") from err
    return httpclient.InferenceServerClient(url.removeprefix("http://"), connection_timeout=timeout,
                                            network_timeout=timeout)


NUMPY_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
                   np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.int8): "INT8",
                   np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}


def infer(client, model_name: str, *arrays: np.ndarray, outputs: int = 1) -> list:
    """Send `arrays` as INPUT__0, INPUT__1, ... (binary data); returns [OUTPUT__0, ...] as numpy arrays."""
    import tritonclient.http as httpclient

    inputs = []
    for i, array in enumerate(arrays):
        array = np.ascontiguousarray(array)
        tensor = httpclient.InferInput(f"INPUT__{i}", list(array.shape), NUMPY_TO_TRITON[array.dtype])
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    wanted = [httpclient.InferRequestedOutput(f"OUTPUT__{i}", binary_data=True) for i in range(outputs)]
    result = client.infer(model_name, inputs, outputs=wanted)
    return [result.as_numpy(f"OUTPUT__{i}") for i in range(outputs)]
