"""data.location: one Location for a local path or an object URL (parse, join, the meta file's
path rule, confinement, fingerprints, local reads). Ranged reads of a file against the same
bytes from a real S3 API are in test_data_remote.py, beside its server."""

import hashlib
import os
import pickle

import pytest

from vlpretrain.data import remote
from vlpretrain.data.index import cache_file
from vlpretrain.data.location import LocalLocation, Location, RemoteLocation
from vlpretrain.data.remote import RemoteSettings

FAST = RemoteSettings(timeout_seconds=3.0, retries=1, backoff_seconds=0.01)


def fingerprint_as_written(path):
    """The digest every existing index cache file name was made with (a file's size, mtime_ns,
    inode, ctime_ns and first and last 64 KiB): a new formula would orphan them all."""
    stat = path.stat()
    digest = hashlib.sha256(
        f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}".encode()
    )
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 16))
        if stat.st_size > 1 << 16:
            handle.seek(max(1 << 16, stat.st_size - (1 << 16)))
            digest.update(handle.read(1 << 16))
    return digest.hexdigest()


def test_parse_tells_urls_from_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Location.parse("s3://bucket/a.jsonl") == RemoteLocation("s3://bucket/a.jsonl")
    assert Location.parse("file:///data/a.jsonl") == RemoteLocation("file:///data/a.jsonl")
    assert Location.parse("~/a.jsonl") == LocalLocation(tmp_path / "a.jsonl")
    # "c:/x" and names with "://" after a non-identifier stay paths
    assert isinstance(Location.parse("my data://x"), LocalLocation)
    location = Location.parse(tmp_path)
    assert Location.parse(location) is location
    assert str(location) == str(tmp_path) and os.fspath(location) == str(tmp_path)


def test_settings_travel_with_a_location_and_to_what_is_joined_to_it():
    root = Location.parse("s3://bucket/images", settings=FAST)
    image = root.join("a.png")
    assert image.settings == FAST and root.join("gs://other/b.png").settings == FAST
    assert Location.parse("c.png", root).settings == FAST
    local_root = Location.parse("/data", settings=FAST)
    assert local_root.join("s3://bucket/d.png").settings == FAST
    # settings are how a location is read, not where it is
    assert image == RemoteLocation("s3://bucket/images/a.png")
    assert pickle.loads(pickle.dumps(image)).settings == FAST


def test_join_puts_a_media_path_below_its_root():
    local = Location.parse("/data/set")
    assert local.join("img/a.png") == LocalLocation(local.path / "img/a.png")
    assert local.join("/abs/b.png") == Location.parse("/abs/b.png")  # as Path's "/"
    assert local.join("../c.png") == Location.parse("/data/set/../c.png")  # kept for messages
    url = Location.parse("s3://bucket/set/")
    assert url.join("img/a.png") == RemoteLocation("s3://bucket/set/img/a.png")
    assert url.join("./x/../b.png") == RemoteLocation("s3://bucket/set/b.png")
    assert url.join("s3://other/c.png") == RemoteLocation("s3://other/c.png")
    assert (url.name, str(url.join("a/b.png").parent)) == ("set", "s3://bucket/set/a")


def test_the_meta_rule_prefers_the_current_directory_for_local_meta_files(tmp_path, monkeypatch):
    here, meta_dir = tmp_path / "here", tmp_path / "meta"
    (here / "imgs").mkdir(parents=True)
    meta_dir.mkdir()
    monkeypatch.chdir(here)

    def rule(value, relative_to):
        return Location.parse(value, relative_to, current_directory_first=True)

    local_meta = Location.parse(meta_dir)
    assert rule("imgs", local_meta) == LocalLocation(here / "imgs")  # exists here
    assert rule("ann.jsonl", local_meta) == LocalLocation(meta_dir / "ann.jsonl")
    remote_meta = Location.parse("s3://bucket/meta")
    assert rule("imgs", remote_meta) == RemoteLocation("s3://bucket/meta/imgs")  # never cwd
    assert rule(str(here / "imgs"), remote_meta) == LocalLocation(here / "imgs")


def test_confinement_resolves_links_locally_and_compares_prefixes_remotely(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    local_root = Location.parse(root)
    assert local_root.join("a.png").is_under(local_root)
    assert not local_root.join("../outside/a.png").is_under(local_root)
    assert not local_root.join("link/a.png").is_under(local_root)  # a link out leaves it
    url_root = Location.parse("s3://bucket/root")
    assert url_root.join("a/b.png").is_under(url_root)
    assert not url_root.join("../root2/b.png").is_under(url_root)  # not a prefix of a name
    assert not url_root.join("s3://bucket/elsewhere/b.png").is_under(url_root)
    assert not local_root.join("s3://bucket/root/b.png").is_under(local_root)
    assert not url_root.is_under(local_root)


@pytest.mark.parametrize("size", [0, 10, (1 << 16) + 5, 3 << 16])
def test_a_local_fingerprint_is_the_one_index_caches_were_written_with(tmp_path, size):
    path = tmp_path / "ann.jsonl"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    fingerprint = Location.parse(path).fingerprint()
    assert fingerprint.digest == fingerprint_as_written(path)
    assert fingerprint.size == size
    digest, key = fingerprint.digest, hashlib.sha256(str(path).encode()).hexdigest()[:16]
    assert cache_file(path, tmp_path) == tmp_path / f"ann.jsonl.{key}.{digest[:16]}.index"


def test_local_reads_never_reach_fsspec(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a local path reached fsspec")

    monkeypatch.setattr(remote, "filesystem", refuse)
    path = tmp_path / "a.bin"
    path.write_bytes(b"0123456789")
    location = Location.parse(path)
    assert location.read_range(3, 4) == b"3456" and location.read_all() == b"0123456789"
    assert location.info().size == 10 and location.is_file() and not location.is_dir()
    assert [str(p) for p in Location.parse(tmp_path).list_files()] == [str(path)]
    assert not location.join("../missing").exists()
