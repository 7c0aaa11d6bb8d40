"""OpenAPI generation: every operation documents the error answers it can give, in the one error shape.

Schemathesis (tests/test_schema_fuzz.py) checks every response against the schema, so a status code or body that
the schema does not describe is a failure. Errors all have the shape of aiwriter.errors.error_body.
"""

from __future__ import annotations

from drf_spectacular.openapi import AutoSchema as BaseAutoSchema
from rest_framework import serializers
from rest_framework.permissions import AllowAny


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Machine-readable error code, e.g. `not_found`, `invalid`.")
    message = serializers.CharField()
    retryable = serializers.BooleanField(help_text="True when the same request may succeed later.")
    fields = serializers.DictField(required=False, help_text="Per-field messages of a validation error (400).")


class ErrorSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()

    class Meta:
        ref_name = "Error"


# Answers any API operation can give.
_ALWAYS = {
    "400": "Bad request: invalid parameters or body (`error.fields` names the fields).",
    "404": "Not found, or not yours.",
    "429": "Rate limit, quota or key budget reached (see `Retry-After`).",
    "503": "A backing service is unavailable; retry.",
}
_AUTHENTICATED = {
    "401": "No or invalid credentials.",
    "403": "Authenticated but not allowed (staff only, a session write without a CSRF token, or API keys managed "
           "with an API key: `key_management_requires_session`).",
}
_WRITES = {
    "409": "Conflict with the current state (busy conversation, reused idempotency key, duplicate).",
    "413": "The request body is larger than MAX_REQUEST_BYTES.",
}
# POSTs that call a model (their views set `calls_models = True`).
_MODEL_CALLS = {
    "402": "The credit balance is too low for the worst-case cost of the call.",
    "502": "The model provider failed.",
    "504": "The model provider did not answer in time.",
}


class AutoSchema(BaseAutoSchema):
    def _error_statuses(self) -> dict[str, str]:
        statuses = dict(_ALWAYS)
        if not any(isinstance(p, AllowAny) for p in self.view.get_permissions()):
            statuses.update(_AUTHENTICATED)
        if self.method in ("POST", "PUT", "PATCH", "DELETE"):
            statuses.update(_WRITES)
        if self.method == "POST" and getattr(self.view, "calls_models", False):
            statuses.update(_MODEL_CALLS)
        return statuses

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        for code, description in self._error_statuses().items():
            if code not in responses:
                response = self._get_response_for_code(ErrorSerializer, code, ["application/json"], direction)
                response["description"] = description
                responses[code] = response
        return dict(sorted(responses.items()))
