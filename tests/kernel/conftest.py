import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import crikit
from tests.helpers import require_containerd, require_kernel


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


@pytest.fixture(scope="session")
def crikit_image() -> Iterator[Path]:
    """The busybox + pause OCI tarball, built once per session."""
    require_containerd()
    with tempfile.TemporaryDirectory(prefix="kt-crikit-image-") as tmp:
        yield crikit.build_image(Path(tmp))


@pytest.fixture(scope="session")
def containerd(crikit_image: Path) -> Iterator[crikit.Containerd]:
    """One private containerd with the CRI plugin for the session; tests remove their pods (whatever is left
    is removed at the end of the session)."""
    with crikit.Containerd(crikit_image) as ctrd:
        yield ctrd


@pytest.fixture
def containerd_podnet(crikit_image: Path) -> Iterator[crikit.Containerd]:
    """A containerd whose pods may have their own network namespace (one at a time, at its pod_address)."""
    with crikit.Containerd(crikit_image, pod_network=True) as ctrd:
        yield ctrd
