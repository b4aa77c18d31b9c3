"""The model store: content-addressed, atomic, verified, and safe under parallel changes."""

import threading

import pytest

from ember.provider.backends.store import Store, StoreError
from ember.provider.domain.digests import file_digests, tree_digest
from ember.provider.domain.records import AddonManifest


@pytest.fixture
def store(tmp_path):
    return Store(f"file://{tmp_path / 'store'}", tmp_path / "locks")


def test_put_is_content_addressed_and_idempotent(store, tmp_path, tiny_model):
    digest, files = store.put_directory(tiny_model)
    assert digest == tree_digest(file_digests(tiny_model)) and "model.safetensors" in files
    again, _ = store.put_directory(tiny_model)
    assert again == digest
    objects = [p for p in (tmp_path / "store" / "objects").iterdir()]
    assert [p.name for p in objects] == [digest.removeprefix("sha256:")]
    store.verify_object(digest)
    assert store.local_path(store.urls.object(digest)) == objects[0]


def test_corruption_and_interrupted_uploads_are_never_served(store, tmp_path, tiny_model):
    digest, _ = store.put_directory(tiny_model)
    weights = tmp_path / "store" / "objects" / digest.removeprefix("sha256:") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StoreError, match=r"files \['model.safetensors'\] do not match their digests"):
        store.verify_object(digest)
    # an upload that died half-way leaves only a staging folder, never a complete object
    staging = tmp_path / "store" / "objects" / ".upload-dead"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    with pytest.raises(StoreError, match="is not in the store"):
        store.verify_object("sha256:" + "0" * 64)


def test_staging_of_a_dead_upload_is_swept_and_a_live_one_kept(store, tmp_path, tiny_model):
    import os
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    objects = tmp_path / "store" / "objects"
    for pid in (dead.pid, os.getpid()):
        staging = objects / f".upload-{socket.gethostname()}-{pid}-0123abcd"
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"half")
    store.put_directory(tiny_model)
    left = sorted(p.name for p in objects.iterdir() if p.name.startswith(".upload-"))
    assert left == [f".upload-{socket.gethostname()}-{os.getpid()}-0123abcd"]  # still uploading: kept


def test_manifests_are_written_whole(store):
    store.write_manifest(AddonManifest(name="accounts/acme/models/m", digest="sha256:1", object="objects/1",
                                       base_model="accounts/acme/models/base", rank=8, target_modules=["q_proj"]))
    assert store.read_manifest("acme", "m").digest == "sha256:1"
    assert [m.name for m in store.manifests()] == ["accounts/acme/models/m"]
    store.delete_manifest("acme", "m")
    assert store.read_manifest("acme", "m") is None


def test_twenty_parallel_changes_to_one_desired_set_all_land(store):
    names = [f"accounts/acme/models/addon-{i}" for i in range(20)]
    barrier = threading.Barrier(20)

    def add(name):
        barrier.wait()
        store.change_desired_addons("acme", "prod", lambda desired: desired.__setitem__(name, f"/objects/{name}"))

    threads = [threading.Thread(target=add, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(store.desired_addons("acme", "prod")) == sorted(names)


def test_two_deletes_of_one_unreferenced_object_side_by_side(store, tiny_model):
    """Found by `destroy` on a real cluster: two addons of the same weights, deleted in parallel, both saw the
    object unreferenced and both removed it; the second failed on the files the first had removed."""
    digest, _ = store.put_directory(tiny_model)
    both_checked = threading.Barrier(2, timeout=1)
    exists = store.fs.exists

    def exists_once_both_checked(path):
        try:
            both_checked.wait()  # without the lock both get here before either removes; with it, one waits
        except threading.BrokenBarrierError:
            pass
        return exists(path)

    store.fs.exists = exists_once_both_checked
    errors = []

    def delete():
        try:
            store.delete_object(digest)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=delete) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.fs.exists = exists
    assert errors == [] and not store.fs.exists(store.paths.object(digest))


def test_keys_are_created_once_and_stored_hashed(store, tmp_path):
    key = store.ensure_key("acme", tmp_path / "keys")
    assert store.ensure_key("acme", tmp_path / "keys") == key
    assert (tmp_path / "keys" / "acme.key").stat().st_mode & 0o777 == 0o600
    assert key not in (tmp_path / "store" / "keys.json").read_text()


def test_a_document_deleted_while_listing_is_skipped(store, monkeypatch):
    """Resources are created and deleted in parallel: a manifest or record listed a moment ago may be gone."""
    store.write_manifest(AddonManifest(name="accounts/acme/models/m", digest="sha256:1", object="objects/1",
                                       base_model="accounts/acme/models/base", rank=8, target_modules=["q_proj"]))
    listed = store.fs.glob(store.paths.manifest("*", "*")) + [store.paths.manifest("acme", "gone")]
    monkeypatch.setattr(store.fs, "glob", lambda pattern: listed)
    assert [m.name for m in store.manifests()] == ["accounts/acme/models/m"]
