"""Every SageMaker request a test's SDK or boto3 client sends, validated against the real service model."""

from __future__ import annotations

import json
from typing import Any

from botocore.validate import validate_parameters


class Captured:
    """Every SageMaker request the SDK sends through a client, as botocore is about to serialize it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.requests: list[tuple[str, dict[str, Any]]] = []
        client.meta.events.register("provide-client-params.sagemaker.*", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.requests.append((model.name, json.loads(json.dumps(params, default=str))))

    def __call__(self, operation: str) -> list[dict[str, Any]]:
        """The requests of ``operation``, each validated against the real service model first."""
        found = [params for name, params in self.requests if name == operation]
        shape = self.client.meta.service_model.operation_model(operation).input_shape
        for params in found:
            validate_parameters(params, shape)  # raises ParamValidationError listing every problem
        return found
