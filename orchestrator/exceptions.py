"""Domain errors that the API turns into 4xx responses."""


class JobBalancerError(Exception):
    """Base class: an error with an HTTP status and a message naming the fix."""

    status_code = 400
    error = "bad_request"

    def __init__(self, detail: str, *, field: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.field = field


class InvalidInputError(JobBalancerError):
    """A request field is missing or has a wrong value."""

    status_code = 422
    error = "invalid_input"


class AuthenticationError(JobBalancerError):
    """No valid credentials were given."""

    status_code = 401
    error = "unauthorized"


class PermissionDeniedError(JobBalancerError):
    """The caller is known but may not do this."""

    status_code = 403
    error = "forbidden"


class NotFoundError(JobBalancerError):
    """The named object does not exist."""

    status_code = 404
    error = "not_found"


class ConflictError(JobBalancerError):
    """The object is in a state that does not allow the action."""

    status_code = 409
    error = "conflict"


class InvalidJsonError(JobBalancerError):
    """The request body is not a JSON object."""

    status_code = 400
    error = "invalid_json"
