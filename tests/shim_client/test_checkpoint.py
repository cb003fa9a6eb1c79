"""Checkpoint through our shims (v1 and v2): the options reach runc and criu, and criu's
failure comes back as a status carrying its message (criu cannot dump on these VMs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any

from containerd_shim import client
from containerd_shim.api.runtime.linux.runctypes.runc_pb2 import CheckpointOptions as V1Options
from containerd_shim.api.runtime.v1.shim.v1 import shim_pb2 as v1api
from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import CheckpointOptions as V2Options
from containerd_shim.api.runtime.v2.task import shim_pb2 as v2api
from containerd_shim.containers import _checkpoint_flags
from ttrpc import Code, RpcError

from .helpers import BundleDir, force_cleanup, start_shim


@pytest.mark.parametrize("options", [V1Options, V2Options])
def test_checkpoint_flags_from_either_api(options: type[V1Options] | type[V2Options]) -> None:
    assert _checkpoint_flags(options()) == []
    every = options(open_tcp=True, external_unix_sockets=True, terminal=True, file_locks=True)
    assert _checkpoint_flags(every) == [
        "--tcp-established",
        "--ext-unix-sk",
        "--shell-job",
        "--file-locks",
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["py-v1", "py-v2"])
def test_checkpoint_reaches_criu(kind: str, bundle: BundleDir, namespace: str) -> None:
    cid = bundle.cid
    bundle.write_spec(["/bin/sleep", "30"])
    shim = start_shim(kind, bundle, cid, namespace)
    image = Path(bundle.bundle) / "image"
    try:
        shim.create(cid, bundle.bundle, client.IO())
        shim.start(cid)
        request: v1api.CheckpointTaskRequest | v2api.CheckpointTaskRequest
        if kind == "py-v1":
            value = V1Options(image_path=str(image), file_locks=True).SerializeToString()
            any_ = Any(type_url="containerd.linux.runc.CheckpointOptions", value=value)
            request = v1api.CheckpointTaskRequest(options=any_)
        else:
            value = V2Options(image_path=str(image), file_locks=True).SerializeToString()
            any_ = Any(type_url="containerd.runc.v1.CheckpointOptions", value=value)
            request = v2api.CheckpointTaskRequest(id=cid, options=any_)
        assert isinstance(shim, (client.ShimV1, client.ShimV2))
        try:
            shim.api.Checkpoint(request, shim._ctx())  # type: ignore[arg-type]
        except RpcError as exc:
            # criu ran (in the default work directory, under the bundle) and failed.
            assert exc.code == Code.FAILED_PRECONDITION, exc
            assert exc.message.startswith("checkpoint failed: criu failed"), exc.message
            assert (Path(bundle.bundle) / "criu-work" / "dump.log").is_file()
        else:  # a machine where criu works: the image is there
            assert (image / "inventory.img").is_file()
    finally:
        shim.close()
        force_cleanup(bundle, namespace, cid)
