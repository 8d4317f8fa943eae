"""Ray's version-bound APIs in one place, and the installed Ray checked against what is tested.

l0sweep needs three things Ray keeps private, and each may change in any release:

- the client side of Ray's token authentication (``ray._private.authentication``), which the
  ``ray`` CLI uses and the job-submission SDK does not expose (:func:`enable_token_auth`,
  :func:`auth_headers`);
- the run config of a restored ``Tuner`` (``tuner._local_tuner``): ``Tuner.restore`` takes no
  callbacks, and the restored pickled ones carry a dead process's sink (:func:`set_tuner_callbacks`);
- the job server's error answers: the SDK raises a bare ``RuntimeError`` whose message carries the
  HTTP status (``JobSubmissionClient._raise_error``). :class:`JobClient` raises
  :class:`JobServerError` (:class:`JobNotFound` for a 404) with the status instead, so that
  callers classify Ray's answers by type, never by message text.

:func:`check_ray_version` fails start-up with a clear error when the installed Ray is outside the
range these were tested on (``pyproject.toml`` pins the same range).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
import requests
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray._private.authentication.authentication_token_setup import (
    maybe_enable_token_auth_if_token_available,
)
from ray._private.authentication.http_token_authentication import (
    get_auth_headers_if_auth_enabled,
)
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

__all__ = [
    "RAY_UNREACHABLE",
    "SUPPORTED_RAY",
    "JobClient",
    "JobNotFound",
    "JobServerError",
    "RayUnreachable",
    "RayVersionError",
    "auth_headers",
    "check_ray_version",
    "enable_token_auth",
    "set_tuner_callbacks",
    "unreachable",
]

# The Ray releases this module's private uses were tested on; pyproject.toml pins the same.
SUPPORTED_RAY = SpecifierSet(">=2.60,<2.61")


class RayVersionError(RuntimeError):
    """The installed Ray is one l0sweep was not tested on."""


class RayUnreachable(ConnectionError):
    """Ray's job server cannot be reached, or what answers at its address is no job server of a
    Ray release the SDK can talk to."""


class JobServerError(RuntimeError):
    """Ray's job server answered a request with an error status.

    A ``RuntimeError``, as the SDK's own error, so that code written against the SDK still
    catches it.
    """

    def __init__(self, status_code: int, text: str) -> None:
        self.status_code = status_code
        self.text = text
        super().__init__(f"Ray's job server answered {status_code}: {text.strip()[:500]}")


class JobNotFound(JobServerError):
    """The job server does not know the job (404): never submitted, deleted, or the cluster
    restarted since."""


# Failures that mean Ray cannot serve now (as opposed to refusing a request): refused, reset or
# timed-out connections, the job server's 5xx answers (see `unreachable`), a token it refuses.
RAY_UNREACHABLE: tuple[type[BaseException], ...] = (
    ConnectionError,  # RayUnreachable included
    TimeoutError,
    requests.RequestException,
    AuthenticationError,
)


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says Ray cannot serve the request now; False for a refusal (a 4xx answer)
    and for anything else, our own bugs included."""
    if isinstance(exc, JobServerError):
        return exc.status_code >= 500
    return isinstance(exc, RAY_UNREACHABLE)


def check_ray_version(installed: str | None = None) -> None:
    """Raise :class:`RayVersionError` unless the installed Ray is in :data:`SUPPORTED_RAY`.

    Args:
        installed: the version to check; default: ``ray.__version__``.
    """
    version = installed or ray.__version__
    if Version(version) not in SUPPORTED_RAY:
        raise RayVersionError(
            f"Ray {version} is installed; l0sweep is tested with ray{SUPPORTED_RAY} and uses "
            "some of its private APIs (sweeps.raycompat): install a release in that range "
            f"(pip install 'ray[tune,default]{SUPPORTED_RAY}')"
        )


def enable_token_auth() -> None:
    """Send Ray's auth token the way the ``ray`` CLI does.

    Ray turns token authentication on for a cluster when ``RAY_AUTH_MODE=token`` or a token file
    (``~/.ray/auth_token``) exists; a client process must opt in the same way before its job
    requests carry the token.
    """
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def auth_headers() -> dict[str, str]:
    """The HTTP headers that carry Ray's token, if token authentication is on (else none)."""
    return dict(get_auth_headers_if_auth_enabled({}))


def set_tuner_callbacks(tuner: Any, callbacks: Sequence[Any]) -> None:
    """Give a restored ``Tuner`` this process's callbacks in place of the pickled ones."""
    tuner._local_tuner.get_run_config().callbacks = list(callbacks)


class JobClient(JobSubmissionClient):
    """Ray's job-submission client, raising typed errors (see the module docstring).

    Raises:
        RayUnreachable: on creation, when the address does not answer as a Ray job server of a
            release the SDK supports.
    """

    def _check_connection_and_version_with_url(
        self,
        min_version: str = "1.9",
        version_error_message: str | None = None,
        url: str = "/api/version",
    ) -> None:
        try:
            super()._check_connection_and_version_with_url(min_version, version_error_message, url)
        except (RuntimeError, requests.RequestException, ValueError) as exc:
            # The SDK's version check: a 404 (no job server there), a 5xx, an old Ray, or a
            # body that is not its JSON. Nothing at this address can run a sweep's driver.
            raise RayUnreachable(f"no Ray job server at {self._address}: {exc}") from exc

    def _raise_error(self, r: requests.Response) -> None:
        if r.status_code == 404:
            raise JobNotFound(r.status_code, r.text)
        raise JobServerError(r.status_code, r.text)
