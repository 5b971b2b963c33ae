"""Request bodies of the JSON API."""

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

MAX_COMMAND_BYTES = 2 << 20
MAX_PARAMS = 250_000
MAX_RETRIES = 20
# Linux rejects an execve whose arguments (strings plus one pointer each) pass
# ARG_MAX, which is 2 MiB with the default 8 MiB stack. Half of that leaves room
# for the environment.
MAX_ARGV_BYTES = 1 << 20


class JobCreate(BaseModel):
    """A job submission, in the JSON shape that existing clients send."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"command": 'echo "Hello World"; sleep 2', "watchdog": 10},
                {"scriptId": 1, "params": ["Value1", "Value2"]},
            ]
        },
    )

    command: str | None = Field(
        default=None, description="Shell command line, run by /bin/sh on the worker"
    )
    scriptId: int | None = Field(
        default=None, description="Id of a stored script (a number or a numeric string)"
    )
    params: list[Any] | dict[str, Any] | None = Field(
        default=None,
        description="Script arguments: a list, or an object whose values are "
        "passed in key order",
    )
    watchdog: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Seconds before the job is killed; 0 is no limit",
    )
    workerClassId: int | str | None = Field(
        default=None, description="Worker class id or name; absent means 'default'"
    )
    need_realtime: bool = Field(
        default=False,
        description="Reject the job as 'occupied' instead of queueing it when no "
        "worker slot is free",
    )
    userName: str | None = Field(default=None, description="Owner of the API key")
    apiKey: str | None = Field(
        default=None, description="API key; an Authorization: Bearer header also works"
    )
    wait: bool = Field(
        default=False,
        description="Hold the request until the job ends and return its output",
    )
    waitTimeout: float | None = Field(
        default=None, gt=0, description="Seconds to wait at most when wait is true"
    )
    retries: int | None = Field(
        default=None,
        ge=0,
        le=MAX_RETRIES,
        description="Further attempts after a failed one (a script's default "
        "applies when absent)",
    )
    retry_delay: float | None = Field(
        default=None, ge=0, le=86400, description="Seconds before the next attempt"
    )
    retry_on: Literal["infra", "any"] | None = Field(
        default=None,
        description="'infra' retries jobs that were lost or could not start; "
        "'any' also retries non-zero exits",
    )
    idempotencyKey: str | None = Field(
        default=None,
        max_length=128,
        description="A client token; repeating it returns the job already "
        "created instead of a new one (the Idempotency-Key header also works)",
    )

    @field_validator("command")
    @classmethod
    def _command_size(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) > MAX_COMMAND_BYTES:
            raise ValueError(f"must be at most {MAX_COMMAND_BYTES} bytes")
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL bytes, which no shell accepts")
        return value

    @field_validator("watchdog", mode="before")
    @classmethod
    def _watchdog_number(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number of seconds, not true or false")
        return value

    @field_validator("params")
    @classmethod
    def _params_scalars(
        cls, value: list[Any] | dict[str, Any] | None
    ) -> list[Any] | dict[str, Any] | None:
        if value is None:
            return None
        items = list(value.values()) if isinstance(value, dict) else value
        if len(items) > MAX_PARAMS:
            raise ValueError(f"must have at most {MAX_PARAMS} entries")
        argv_bytes = 0
        for index, item in enumerate(items):
            if isinstance(item, (list, dict)):
                raise ValueError(
                    f"entry {index} is a {type(item).__name__}: use strings or numbers"
                )
            argv_bytes += len(str(item).encode()) + 1 + 8
        if argv_bytes > MAX_ARGV_BYTES:
            raise ValueError(
                f"the arguments take about {argv_bytes} bytes, more than the "
                f"{MAX_ARGV_BYTES} that a worker's execve accepts (ARG_MAX): pass "
                "the data in a file or through fewer, shorter params"
            )
        return value

    def param_list(self) -> list[str]:
        """Return params as strings, object values in key order."""
        if self.params is None:
            return []
        items = (
            list(self.params.values()) if isinstance(self.params, dict) else self.params
        )
        return ["" if item is None else _to_text(item) for item in items]


def _to_text(item: Any) -> str:
    if isinstance(item, bool):
        return "true" if item else "false"
    return str(item)


class WorkerCreate(BaseModel):
    """A new worker."""

    name: str = Field(min_length=1, max_length=64)
    transport: str = "ssh"
    host: str = ""
    port: int = Field(default=22, ge=1, le=65535)
    user: str = ""
    key_path: str | None = None
    worker_class: str = "default"
    max_jobs: int | None = Field(default=None, ge=1)
    max_sessions: int = Field(default=10, ge=1)


class WorkerUpdate(BaseModel):
    """Changes to a worker; absent fields stay as they are."""

    enabled: bool | None = None
    draining: bool | None = None
    max_jobs: int | None = Field(default=None, ge=1)
    max_sessions: int | None = Field(default=None, ge=1)


class ScriptCreate(BaseModel):
    """A new stored script."""

    name: str = Field(min_length=1, max_length=128)
    interpreter: str = Field(default="/bin/sh", min_length=1)
    body: str


class ErrorDetail(BaseModel):
    """One validation problem: where it is and what is wrong."""

    loc: list[str]
    msg: str


class ErrorPublic(BaseModel):
    """The body of every 4xx and 503 response."""

    result: bool = False
    error: str = Field(description="A stable error code, such as invalid_input")
    detail: str = Field(description="What is wrong and how to fix it")
    field: str | None = Field(default=None, description="The request field at fault")
    errors: list[ErrorDetail] | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorPublic, "description": "Invalid request"},
    503: {"model": ErrorPublic, "description": "Database unavailable; retry"},
}
