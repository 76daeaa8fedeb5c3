"""A read-only client of the Kubernetes Container Runtime Interface (runtime.v1) over the runtime's unix socket.

Only the calls ktrace needs to name a container: Version, ListPodSandbox, ListContainers and ContainerStatus.
Every call has a deadline; a runtime that does not answer costs that deadline once, then the caller stops asking.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# grpc's C core logs connection failures on stderr by itself; ktrace reports them as one warning line instead
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402

from ktrace.cri import cri_pb2 as pb  # noqa: E402

SERVICE = "/runtime.v1.RuntimeService/"
# what kubelet allows (pkg/kubelet/cri/remote): pod annotations make ListPodSandbox large on a dense node
MAX_MESSAGE_BYTES = 16 << 20
# kubelet's labels on every container and sandbox it asks for (pkg/kubelet/types/labels.go)
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
POD_UID_LABEL = "io.kubernetes.pod.uid"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"


class CriError(Exception):
    """A call failed; `unreachable` when the runtime itself did not answer (no listener, hung, wrong protocol)."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class Names:
    """What the runtime knows of one container or pod sandbox; None where it does not say."""

    pod_uid: str | None
    namespace: str | None
    pod: str | None
    container: str | None  # None for a pod sandbox (pause) container
    image: str | None
    sandbox_id: str | None


def _or_none(value: str) -> str | None:
    return value or None


class CriClient:
    def __init__(self, socket: Path, timeout_s: float) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        # the default authority of a unix: target is the socket path, which some runtimes' HTTP/2 servers reject
        self._channel = grpc.insecure_channel(f"unix://{socket.resolve()}",
                                              options=[("grpc.default_authority", "localhost"),
                                                       ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self._calls = {
            name: self._channel.unary_unary(SERVICE + name, request_serializer=request.SerializeToString,
                                            response_deserializer=response.FromString)
            for name, request, response in (
                ("Version", pb.VersionRequest, pb.VersionResponse),
                ("ListPodSandbox", pb.ListPodSandboxRequest, pb.ListPodSandboxResponse),
                ("ListContainers", pb.ListContainersRequest, pb.ListContainersResponse),
                ("ContainerStatus", pb.ContainerStatusRequest, pb.ContainerStatusResponse),
            )
        }

    def _call(self, name: str, request: object) -> object:
        try:
            return self._calls[name](request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                   grpc.StatusCode.UNIMPLEMENTED)
            what = code.name if code is not None else type(e).__name__
            detail = e.details() if hasattr(e, "details") else ""
            raise CriError(f"{name}: {what}{f' ({detail})' if detail else ''}", unreachable) from None

    def version(self) -> dict:
        v = self._call("Version", pb.VersionRequest(version="v1"))
        return {"runtime_name": v.runtime_name, "runtime_version": v.runtime_version,
                "runtime_api_version": v.runtime_api_version}

    def sandboxes(self) -> list[Names]:
        """Every pod sandbox the runtime knows, ready or not."""
        items = self._call("ListPodSandbox", pb.ListPodSandboxRequest()).items
        return [Names(_or_none(s.metadata.uid), _or_none(s.metadata.namespace), _or_none(s.metadata.name), None,
                      None, s.id) for s in items]

    def containers(self) -> dict[str, Names]:
        """Every container the runtime still knows (running or exited), by id; pod names from kubelet's labels."""
        found = {}
        for c in self._call("ListContainers", pb.ListContainersRequest()).containers:
            found[c.id] = self._names(c.labels, c.metadata.name, c.image.image, c.pod_sandbox_id)
        return found

    def container(self, container_id: str) -> Names | None:
        """One container by id; None when the runtime does not know it (it may be a sandbox, or removed)."""
        try:
            status = self._call("ContainerStatus", pb.ContainerStatusRequest(container_id=container_id)).status
        except CriError as e:
            if e.unreachable:
                raise
            return None
        return self._names(status.labels, status.metadata.name, status.image.image, None)

    @staticmethod
    def _names(labels: dict, name: str, image: str, sandbox_id: str | None) -> Names:
        return Names(_or_none(labels.get(POD_UID_LABEL, "")), _or_none(labels.get(POD_NAMESPACE_LABEL, "")),
                     _or_none(labels.get(POD_NAME_LABEL, "")),
                     _or_none(labels.get(CONTAINER_NAME_LABEL, "")) or _or_none(name), _or_none(image),
                     _or_none(sandbox_id or ""))

    def close(self) -> None:
        self._channel.close()
