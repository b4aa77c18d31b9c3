"""The gateway's scaler for deployments on Kubernetes: the `scale` subresource of their apps/v1 Deployment, through the
API server.

A HorizontalPodAutoscaler moves the Deployment between 1 and max_replicas and leaves one at 0 replicas alone, so the
gateway only takes an idle deployment to 0 and back to 1 when a request comes (`follows_load = False`). Its pods do that
as their service account, which KubernetesGateway allows get and patch on `deployments/scale` of the Deployments it
was given, and nothing else (provider/kubernetes.py).

Which credentials: the workload's kubeconfig where this process has that file (a gateway run beside `pulumi up`); else,
in a pod, its service account's token and CA; else the ambient kubeconfig (KUBECONFIG, ~/.kube/config). The record's
kubeconfig is the path `pulumi up` read on its own machine, which a gateway pod does not have: that is why a missing
file is not an error in a pod.

Plain HTTP (httpx, as the gateway's other calls) with short timeouts, so that a slow API server delays a tick, never
stalls the gateway; the `kubernetes` package only reads a kubeconfig (every form of credentials it names). When the API
server cannot be reached or refuses, `running` says None (and logs why, once while it lasts) and `resize` raises a
ScaleError naming the deployment, its workload and the answer; a conflict (changed meanwhile) is a resize not made
this time (None), as the Scaler protocol has it.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from ember.provider.domain.kinds.deployment import KubernetesWorkload
from ember.runtime.gateway.directory import Deployment
from ember.runtime.gateway.scalers import Scaler

log = logging.getLogger("ember.gateway")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
FIELD_MANAGER = "ember-gateway"  # names the writer of the change to the API server (its audit log)
TIMEOUT = httpx.Timeout(5.0, connect=3.0)


class ScaleError(RuntimeError):
    """The API server could not be reached, or refused: the message names the deployment, its workload and what the
    API server answered."""


@dataclass(frozen=True)
class _Api:
    """One way to the API server: a client bound to its address and TLS, and the Authorization header (read at each
    call: a service account token is rotated by the kubelet, a kubeconfig's exec plugin renews its own)."""

    server: str
    client: httpx.Client
    authorization: Callable[[], str | None]


class KubernetesScaler:
    follows_load = False

    def __init__(self, service_account: Path = SERVICE_ACCOUNT, environ: Mapping[str, str] = os.environ,
                 transport: httpx.BaseTransport | None = None, timeout: httpx.Timeout = TIMEOUT):
        # Nothing is read until a deployment on Kubernetes is scaled: a gateway with none pays nothing.
        self.service_account, self.environ = service_account, environ
        self.transport, self.timeout = transport, timeout
        self._apis: dict[str | None, _Api] = {}  # by kubeconfig path ("": the ambient one; None: the pod's account)
        self._lock = threading.Lock()  # the autoscaler calls from worker threads
        self._said: dict[str, str] = {}  # the last failure logged per deployment, so a lasting one is logged once

    def handles(self, deployment: Deployment) -> bool:
        record = deployment.record
        if record is None or record.cluster != "kubernetes" or record.kubernetes_workload is None:
            return False
        # A gateway pod given nothing to scale (KubernetesGatewayArgs.scales) mounts no token: it leaves the count to
        # Kubernetes rather than fail at every tick, and holds no request for a replica it could not start.
        return self._pod_token() is not False or self._kubeconfig_file(record.kubernetes_workload) is not None

    def running(self, deployment: Deployment) -> int | None:
        try:
            count = self._scale(deployment, None)
        except ScaleError as exc:
            if self._said.get(deployment.name) != str(exc):
                log.warning("%s", exc)
                self._said[deployment.name] = str(exc)
            return None
        self._said.pop(deployment.name, None)
        return count

    def resize(self, deployment: Deployment, count: int) -> int | None:
        try:
            return self._scale(deployment, count)
        except _Conflict:
            return None

    def _scale(self, deployment: Deployment, count: int | None) -> int:
        """The Deployment's spec.replicas, after setting it to `count` when given."""
        workload = deployment.record.kubernetes_workload
        where = f"{workload.namespace}/{workload.name}"
        doing = f"reading the scale of {where}" if count is None else f"scaling {where} to {count}"
        api = self._api(deployment, workload)
        path = f"/apis/apps/v1/namespaces/{workload.namespace}/deployments/{workload.name}/scale"
        headers = {"Accept": "application/json"}
        try:
            authorization = api.authorization()
        except Exception as exc:  # a token file gone, a kubeconfig's credentials plugin failing
            raise ScaleError(f"{deployment.name}: {doing}: no credentials for the API server at {api.server}: "
                             f"{type(exc).__name__}: {exc}") from None
        if authorization:
            headers["Authorization"] = authorization
        try:
            if count is None:
                response = api.client.get(path, headers=headers)
            else:
                response = api.client.patch(path, params={"fieldManager": FIELD_MANAGER}, json={
                    "spec": {"replicas": count}}, headers=headers | {"Content-Type": "application/merge-patch+json"})
        except (httpx.HTTPError, OSError) as exc:
            raise ScaleError(f"{deployment.name}: {doing}: no answer from the API server at {api.server}: "
                             f"{type(exc).__name__}: {exc}") from None
        if response.status_code == 409:
            raise _Conflict(f"{deployment.name}: {doing}: changed meanwhile ({_reason(response)})")
        if not response.is_success:
            raise ScaleError(f"{deployment.name}: {doing}: the API server at {api.server} answered "
                             f"{response.status_code} {response.reason_phrase}: {_reason(response)}")
        try:
            # Scale's spec.replicas is left out of the JSON when it is 0
            return int(response.json().get("spec", {}).get("replicas", 0))
        except (ValueError, AttributeError):
            raise ScaleError(f"{deployment.name}: {doing}: the API server at {api.server} answered with no Scale: "
                             f"{response.text[:200]!r}") from None

    def _api(self, deployment: Deployment, workload: KubernetesWorkload) -> _Api:
        source = self._source(deployment, workload)
        with self._lock:  # one client per source, kept: its connections are reused from tick to tick
            if source not in self._apis:
                self._apis[source] = self._in_pod_api(deployment) if source is None else \
                    self._kubeconfig_api(deployment, source or None)
            return self._apis[source]

    def _source(self, deployment: Deployment, workload: KubernetesWorkload) -> str | None:
        """A kubeconfig's path, "" for the ambient kubeconfig, or None for the pod's service account."""
        if kubeconfig := self._kubeconfig_file(workload):
            return kubeconfig
        if self._pod_token():
            return None
        if workload.kubeconfig:
            raise ScaleError(f"{deployment.name}: kubernetes_workload.kubeconfig: no file at "
                             f"{os.path.expanduser(workload.kubeconfig)!r}, and this gateway does not run in a pod with "
                             f"a service account")
        return ""

    @staticmethod
    def _kubeconfig_file(workload: KubernetesWorkload) -> str | None:
        path = os.path.expanduser(workload.kubeconfig) if workload.kubeconfig else None
        return path if path and os.path.isfile(path) else None

    def _pod_token(self) -> bool | None:
        """In a pod, whether its service account's token is mounted; None outside one."""
        if not self.environ.get("KUBERNETES_SERVICE_HOST"):
            return None
        return (self.service_account / "token").is_file()

    def _in_pod_api(self, deployment: Deployment) -> _Api:
        host, port = self.environ["KUBERNETES_SERVICE_HOST"], self.environ.get("KUBERNETES_SERVICE_PORT", "443")
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        token, ca = self.service_account / "token", self.service_account / "ca.crt"
        try:
            context = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ScaleError(f"{deployment.name}: the service account's CA ({ca}) cannot be read: {exc}") from None
        return _Api(server, self._client(server, context), lambda: f"Bearer {token.read_text().strip()}")

    def _kubeconfig_api(self, deployment: Deployment, kubeconfig: str | None) -> _Api:
        from kubernetes import config
        from kubernetes.client import Configuration

        settings = Configuration()
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=settings, persist_config=False)
        except (config.ConfigException, OSError, ValueError) as exc:
            field = "kubernetes_workload.kubeconfig" if kubeconfig else "the ambient kubeconfig"
            raise ScaleError(f"{deployment.name}: {field} ({kubeconfig or 'KUBECONFIG or ~/.kube/config'}): "
                             f"{exc}") from None
        try:
            context = ssl.create_default_context(cafile=settings.ssl_ca_cert or None)
            if settings.cert_file:
                context.load_cert_chain(settings.cert_file, settings.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ScaleError(f"{deployment.name}: the TLS files of {kubeconfig or 'the ambient kubeconfig'}: "
                             f"{exc}") from None
        if not settings.verify_ssl:  # insecure-skip-tls-verify, as the kubeconfig says
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        server = settings.host.rstrip("/")
        return _Api(server, self._client(server, context), lambda: _authorization(settings))

    def _client(self, server: str, context: ssl.SSLContext) -> httpx.Client:
        return httpx.Client(base_url=server, verify=context, timeout=self.timeout, transport=self.transport)


class _Conflict(ScaleError):
    """Changed by someone else meanwhile: not a failure, the next tick reads it again."""


def _authorization(settings) -> str | None:
    """The Authorization header a kubeconfig gives (a token, renewed by its exec plugin when expired); its key in the
    client's settings differs between versions of the kubernetes package, its auth settings' shape does not."""
    for auth in settings.auth_settings().values():
        if auth.get("in") == "header" and auth.get("key", "").lower() == "authorization" and auth.get("value"):
            return auth["value"]
    return None


def _reason(response: httpx.Response) -> str:
    """The API server's reason, from its Status object (or the start of whatever else it sent)."""
    try:
        status = response.json()
        return str(status.get("message") or status)[:300]
    except (ValueError, AttributeError):
        return response.text[:300] or "(no body)"


def kubernetes_scalers() -> list[Scaler]:
    return [KubernetesScaler()]
