"""Tests for stablenets.data: downloads, safe extraction, HDF5 layout and every data source.

Archives are built in tmp_path in the real formats (the official CIFAR-10 python tarball and
BSR_bsds500.tgz layouts, only smaller) and served through file:// URLs.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import importlib
import io
import os
import pickle
import re
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from stablenets import data as D
from stablenets.data.format import SCORED_SPLITS
from stablenets.data.synthetic import _load_photo

# the module (``stablenets.data.download`` is also the package's name for its function)
DOWNLOAD = importlib.import_module("stablenets.data.download")

CLASS_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def add_special(tar: tarfile.TarFile, name: str, kind: bytes, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    tar.addfile(info)


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or directories left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def cifar_batch(rng: np.random.Generator, n: int, label: str) -> dict:
    """One batch in the official format: uint8 (N, 3072) rows and a list of int labels."""
    return {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def make_cifar_archive(
    folder: Path, n_per_batch: int = 6, n_test: int = 8, test=True, first_label: int | None = None
) -> tuple:
    """A tiny cifar-10-python.tar.gz: 5 training batches, test batch, meta and readme
    (``first_label``: the test batch's first label instead of a drawn one)."""
    rng = np.random.default_rng(7)
    batches = [cifar_batch(rng, n_per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    test_batch = cifar_batch(rng, n_test, "testing batch 1 of 1")
    if first_label is not None:
        test_batch[b"labels"][0] = first_label
    meta = {b"label_names": [n.encode() for n in CLASS_NAMES], b"num_cases_per_batch": 6}
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_dir(tar, "cifar-10-batches-py")
        for i, batch in enumerate(batches, start=1):
            payload = pickle.dumps(batch, protocol=2)
            if i == 1:  # the official files were pickled before numpy.core became numpy._core
                payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            add_bytes(tar, f"cifar-10-batches-py/data_batch_{i}", payload)
        if test:
            add_bytes(tar, "cifar-10-batches-py/test_batch", pickle.dumps(test_batch, protocol=2))
        add_bytes(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        add_bytes(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
    return archive, batches, test_batch


def jpeg_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BSDS_SHAPES = {
    "train": {"b_2.jpg": (12, 16), "a_1.jpg": (10, 14), "c_portrait.jpg": (16, 12)},
    "val": {"v_1.jpg": (10, 14)},
    "test": {"t_2.jpg": (14, 10), "t_1.jpg": (11, 15)},
}


def make_bsds_archive(folder: Path) -> tuple[Path, dict[str, dict[str, bytes]]]:
    """A tiny BSR_bsds500.tgz with the official folder layout (and a stray Thumbs.db)."""
    rng = np.random.default_rng(3)
    files = {
        split: {name: jpeg_bytes(rng, *shape) for name, shape in shapes.items()}
        for split, shapes in BSDS_SHAPES.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "BSR_bsds500.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for split, contents in files.items():
            base = f"BSR/BSDS500/data/images/{split}"
            add_dir(tar, base)
            add_bytes(tar, f"{base}/Thumbs.db", b"not an image")
            for name, payload in contents.items():
                add_bytes(tar, f"{base}/{name}", payload)
        add_bytes(tar, "BSR/BSDS500/data/groundTruth/train/a_1.mat", b"matlab")
    return archive, files


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{g}/{k}": f[g][k][()] for g in f for k in f[g]}


# --------------------------------------------------------------------------------------------
# checksums and downloads
# --------------------------------------------------------------------------------------------


def test_download_verifies_and_keeps_an_existing_good_copy(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    dest = tmp_path / "out" / "file.bin"
    got = D.download([src.as_uri()], dest, md5=md5_of(src), sha256=sha256_of(src))
    assert got == dest and dest.read_bytes() == src.read_bytes()
    assert leftovers(dest.parent) == []
    # A good copy is kept: no URL is contacted (this one would fail).
    D.download([(tmp_path / "gone").as_uri()], dest, sha256=sha256_of(src))
    assert dest.read_bytes() == src.read_bytes()


def test_download_requires_a_checksum(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    with pytest.raises(D.DataError, match="no md5 or sha256"):
        D.download([src.as_uri()], tmp_path / "dest.bin")
    assert not (tmp_path / "dest.bin").exists()


def test_download_corrupted_archive_fails_clearly_and_leaves_nothing(tmp_path):
    archive, _, _ = make_cifar_archive(tmp_path)
    good_md5 = md5_of(archive)
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    dest_dir = tmp_path / "downloads"
    dest_dir.mkdir()
    with pytest.raises(D.DataError) as err:
        D.download([archive.as_uri()], dest_dir / archive.name, md5=good_md5)
    message = str(err.value)
    assert archive.as_uri() in message and "checksum mismatch" in message
    assert good_md5 in message and md5_of(archive) in message
    assert list(dest_dir.iterdir()) == []


def test_download_falls_back_to_a_mirror(tmp_path):
    src = tmp_path / "mirror.bin"
    src.write_bytes(b"mirrored")
    dead = (tmp_path / "no_such_file").as_uri()
    dest = tmp_path / "dest.bin"
    D.download([dead, src.as_uri()], dest, md5=md5_of(src))
    assert dest.read_bytes() == b"mirrored"


def test_download_over_http_skips_a_404_mirror(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # talk to the local server directly
    (tmp_path / "file.bin").write_bytes(b"served over http")
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            dest = tmp_path / "dl" / "file.bin"
            urls = [f"{base}/missing.bin", f"{base}/file.bin"]
            D.download(urls, dest, md5=md5_of(tmp_path / "file.bin"), timeout=10)
        finally:
            server.shutdown()
    assert dest.read_bytes() == b"served over http"


def test_a_download_says_how_far_it_is_with_rate_and_eta(tmp_path, monkeypatch):
    """Over http (the server gives the length): progress lines with MB done of total, rate and
    ETA, a line per failed mirror and one at the end; with ``log`` unset, nothing is said."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "big.bin").write_bytes(bytes(3 * DOWNLOAD._CHUNK_BYTES + 5))
    md5 = md5_of(tmp_path / "big.bin")
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    lines: list[str] = []
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            urls = [f"{base}/missing.bin", f"{base}/big.bin"]
            D.download(urls, tmp_path / "a.bin", md5=md5, log=lines.append, progress_every_s=0)
            D.download(urls[1:], tmp_path / "b.bin", md5=md5, progress_every_s=0)  # silent
        finally:
            server.shutdown()
    assert lines[0].startswith(f"failed {base}/missing.bin: HTTP Error 404")
    progress = lines[1:-1]
    assert len(progress) == 4, lines  # one per chunk read at every_s = 0
    assert re.fullmatch(
        rf"downloading {base}/big\.bin: 1\.0 of 3\.1 MB \(33 %\), [\d.]+ MB/s, ETA \d+ s",
        progress[0],
    ), progress[0]
    assert "3.1 of 3.1 MB (100 %)" in progress[-1]
    assert re.fullmatch(rf"downloaded {base}/big\.bin: 3\.1 MB in \d+ s", lines[-1]), lines[-1]
    assert (tmp_path / "b.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()


def test_download_progress_without_a_length_gives_no_eta():
    line = DOWNLOAD._progress("file:///x", 2_500_000, None, 2.0)
    assert line == "downloading file:///x: 2.5 MB, 1.2 MB/s"


def test_download_lists_every_failed_url(tmp_path):
    dead = [(tmp_path / "a").as_uri(), "ftp://example.invalid/x", (tmp_path / "b").as_uri()]
    with pytest.raises(D.DataError) as err:
        D.download(dead, tmp_path / "dest.bin", sha256="0" * 64)
    assert all(url in str(err.value) for url in dead)
    assert "unsupported URL scheme" in str(err.value)
    assert leftovers(tmp_path) == [] and not (tmp_path / "dest.bin").exists()


def test_a_full_or_read_only_cache_fails_once_naming_the_folder_not_each_mirror(
    tmp_path, monkeypatch
):
    """A full disk was reported as each mirror's failure, after downloading from the next one
    again; a read-only cache likewise, without naming the folder."""
    (tmp_path / "file.bin").write_bytes(b"payload")
    md5 = md5_of(tmp_path / "file.bin")
    urls = [(tmp_path / "file.bin").as_uri(), (tmp_path / "file.bin").as_uri()]
    tried = []

    def full(url, target, *args):
        tried.append(url)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DOWNLOAD, "_fetch", full)
    cache = tmp_path / "cache"
    with pytest.raises(D.DataError) as err:
        D.download(urls, cache / "a.bin", md5=md5)
    assert str(err.value) == (
        f"cache folder {cache}: No space left on device while downloading {urls[0]}"
    )
    assert tried == urls[:1] and leftovers(cache) == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(DOWNLOAD.tempfile, "TemporaryFile", read_only)
    with pytest.raises(D.DataError, match=f"^cache folder {cache}: cannot write: Read-only"):
        D.download(urls, cache / "b.bin", md5=md5)
    assert tried == urls[:1]


def test_a_killed_downloads_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    """A download killed mid-way left ``.<archive>.*.part`` (up to 170 MB) that no rerun
    removed; another job's download into the same cache, still growing, must be left alone."""
    (tmp_path / "file.bin").write_bytes(b"payload")
    cache = tmp_path / "cache"
    cache.mkdir()
    dead, live = cache / ".a.bin.dead.part", cache / ".a.bin.live.part"
    for part in (dead, live):
        part.write_bytes(b"half")
    old = time.time() - DOWNLOAD.STALE_DOWNLOAD_S - 1
    os.utime(dead, (old, old))
    lines: list[str] = []
    D.download([(tmp_path / "file.bin").as_uri()], cache / "a.bin",
               md5=md5_of(tmp_path / "file.bin"), log=lines.append)  # fmt: skip
    assert sorted(p.name for p in cache.iterdir()) == [live.name, "a.bin"]
    assert f"removed {dead}, left by a download that was killed" in lines


def test_the_data_job_removes_what_a_killed_conversion_left_beside_its_output(tmp_path):
    from stablenets.pipeline.jobs import prepare_data

    out = tmp_path / "data" / "bsds500.h5"
    (out.parent / f".{out.name}.k1l2" / "archive").mkdir(parents=True)  # an extraction folder
    (out.parent / f".{out.name}.x9.tmp").write_bytes(b"half an HDF5 file")
    photos = {"size": [40, 48], "n_train": 4, "n_val": 2, "n_test": 2, "seed": 0}
    spec = {"dataset": "bsds500", "source": "photos", "photos": photos}
    lines: list[str] = []
    prepare_data(spec, tmp_path / "cache", [], out, log=lines.append)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert sum("left by a conversion that was killed" in line for line in lines) == 2


def test_offline_a_cached_archive_that_fails_its_checksum_is_named_with_both_digests(tmp_path):
    """No URL answers (an offline machine): the error still says why the cached copy was not
    used, with the expected and the actual digest (the BSDS500 md5 is from one source only)."""
    dest = tmp_path / "downloads" / "BSR_bsds500.tgz"
    dest.parent.mkdir()
    dest.write_bytes(b"not the archive")
    lines: list[str] = []
    with pytest.raises(D.DataError) as err:
        D.download([(tmp_path / "gone").as_uri()], dest, md5="0" * 32, log=lines.append)
    message = str(err.value)
    assert f"the cached copy: {dest}: checksum mismatch, expected md5 {'0' * 32}, got " in message
    assert md5_of(dest) in message and (tmp_path / "gone").as_uri() in message
    assert lines[0].startswith(f"fetching again: {dest}: checksum mismatch")
    assert dest.read_bytes() == b"not the archive"  # never replaced by anything unverified


def test_verify_checksum(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    D.verify_checksum(path, md5=md5_of(path).upper())  # case-insensitive
    with pytest.raises(D.DataError, match="expected sha256 " + "f" * 64):
        D.verify_checksum(path, sha256="f" * 64)
    with pytest.raises(D.DataError, match="no such file"):
        D.verify_checksum(tmp_path / "missing", md5="0" * 32)


# --------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------


def test_safe_extract_tar_and_zip(tmp_path):
    tar_path = tmp_path / "ok.tar.bz2"
    with tarfile.open(tar_path, "w:bz2") as tar:
        add_dir(tar, "top")
        add_bytes(tar, "top/a.txt", b"alpha")
        add_bytes(tar, "top/sub/b.txt", b"beta")
        add_special(tar, "top/link", tarfile.SYMTYPE, "sub/b.txt")  # stays inside: allowed
    files = D.safe_extract(tar_path, tmp_path / "t")
    assert files == sorted([tmp_path / "t/top/a.txt", tmp_path / "t/top/sub/b.txt"])
    assert (tmp_path / "t/top/link").read_bytes() == b"beta"

    zip_path = tmp_path / "ok.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("d/c.txt", b"gamma")
    assert D.safe_extract(zip_path, tmp_path / "z") == [tmp_path / "z/d/c.txt"]
    assert (tmp_path / "z/d/c.txt").read_bytes() == b"gamma"
    with pytest.raises(D.DataError, match="not empty"):
        D.safe_extract(zip_path, tmp_path / "z")


def test_safe_extract_refuses_a_non_archive(tmp_path):
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not an archive at all")
    with pytest.raises(D.DataError, match="junk.tgz"):
        D.safe_extract(junk, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# the HDF5 layout
# --------------------------------------------------------------------------------------------


def test_write_h5_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    splits = {
        "train": {"images": images, "labels": np.array([0, 1, 2, 1], dtype=np.int32)},
        "test": {"images": images[:2], "labels": np.array([3, 4])},
    }
    attrs = {"source": "unit", "seed": 3, "noise": 0.5, "flag": True, "nested": {"a": [1, 2]}}
    out = tmp_path / "d.h5"
    D.write_h5(out, splits, attrs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]
    x, y = D.read_split(out, "train")
    assert D.split_size(out, "train") == 4 and D.split_size(out, "test") == 2
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(images).float() / 255)
    assert y.tolist() == [0, 1, 2, 1]
    got = D.read_attrs(out)
    assert got["nested"] == {"a": [1, 2]} and got["source"] == "unit"
    assert got["seed"] == 3 and got["noise"] == 0.5 and got["flag"] is True


def test_write_h5_rejects_bad_input_and_keeps_nothing(tmp_path):
    good = np.ones((2, 1, 3, 3), np.uint8)
    out = tmp_path / "bad.h5"
    with pytest.raises(D.DataError, match="uint8"):
        D.write_h5(out, {"train": {"images": good.astype(np.float32)}}, {})
    with pytest.raises(D.DataError, match="some splits have labels"):
        D.write_h5(out, {"train": {"images": good, "labels": [0, 1]}, "val": {"images": good}}, {})
    with pytest.raises(D.DataError, match="'labels' has shape"):
        D.write_h5(out, {"train": {"images": good, "labels": np.zeros(3, int)}}, {})
    assert list(tmp_path.iterdir()) == []


def test_read_split_errors_name_the_problem(tmp_path):
    with pytest.raises(D.DataError, match="missing.h5: no such dataset file"):
        D.read_split(tmp_path / "missing.h5", "train")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF garbage")
    with pytest.raises(D.DataError, match="corrupt.h5: not a readable HDF5"):
        D.read_split(corrupt, "train")
    out = tmp_path / "d.h5"
    D.write_h5(out, {"train": {"images": np.ones((1, 1, 2, 2), np.uint8)}}, {})
    with pytest.raises(D.DataError, match=r"no split 'test'.*\['train'\]"):
        D.read_split(out, "test")
    with pytest.raises(D.DataError, match=r"no split 'test'.*\['train'\]"):
        D.split_size(out, "test")
    x, y = D.read_split(out, "train")
    assert y is None and x.shape == (1, 1, 2, 2)


def _hand_written(path: Path, images: np.ndarray, labels: np.ndarray | None, classes: int) -> Path:
    """A dataset file made by hand, not by ``write_h5``, which would refuse some of these;
    ``labels`` None: a denoising file."""
    with h5py.File(path, "w") as f:
        f.attrs["num_classes"] = classes
        f.create_dataset("test/images", data=images)
        if labels is not None:
            f.create_dataset("test/labels", data=labels)
    return path


#: Three 4x4 photos, the second all black (a denoiser's PSNR, peaked at its maximum, is -inf).
_ONE_BLACK = np.stack([np.full((3, 4, 4), v, np.uint8) for v in (7, 0, 255)])


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((0, 3, 4, 4), np.uint8), np.zeros(0, np.int64), "split 'test' has no images"),
        (np.zeros((3, 3, 4, 4), np.uint8), np.zeros(2, np.int64),
         r"'labels' has shape \(2,\), expected first axis 3"),
        (np.zeros((3, 3, 4, 4), np.uint8), np.array([0, 10, 11]),
         r"test/labels holds 10, outside 0 \.\. 9 \(2 of 3 labels\)"),
        (np.zeros((3, 3, 4, 4), np.uint8), np.array([0, -1, 2]),
         r"test/labels holds -1, outside 0 \.\. 9 \(1 of 3 labels\)"),
        (np.zeros((3, 3, 4, 4), np.uint8), np.zeros(3, np.float32), "'labels' must be a 1-D integer"),
        (np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.int64),
         r"needs 'images' as a uint8 \(N, C, H, W\) array, not uint8 \(3, 4, 4\)"),
        (_ONE_BLACK, None, r"test/images\[1\] is all black: its PSNR .* undefined \(1 of 3\)"),
        (_ONE_BLACK[:0], None, "split 'test' has no images"),  # nothing to find black
    ],
)  # fmt: skip
def test_a_hand_written_split_a_job_cannot_use_fails_in_one_line_naming_the_file(
    tmp_path, images, labels, message
):
    """Without these checks the jobs failed deep inside: an IndexError in the loss or the
    margins, a ZeroDivisionError in validation, an FFT error in PnP; an all-black test photo
    gave a PSNR of -inf (and a validation one a best that never improves)."""
    path = _hand_written(tmp_path / "hand.h5", images, labels, classes=10)
    with pytest.raises(D.DataError, match=f"hand.h5: .*{message}"):
        D.read_split(path, "test")


def test_the_data_rule_refuses_an_all_black_scored_photo_and_keeps_black_training_ones(tmp_path):
    """A training photo is cut into patches, where a black one is harmless; a validation or
    test photo is scored by a PSNR peaked at its maximum. ``write_h5`` (the data rule) refuses
    the latter, so no file a job would refuse is ever written."""
    train = {"images": _ONE_BLACK}
    D.write_h5(tmp_path / "ok.h5", {"train": train, "val": {"images": _ONE_BLACK[:1]}}, {})
    assert D.read_split(tmp_path / "ok.h5", "train")[0].shape == (3, 3, 4, 4)
    for split in SCORED_SPLITS:
        with pytest.raises(D.DataError, match=rf"bad.h5: {split}/images\[1\] is all black"):
            D.write_h5(tmp_path / "bad.h5", {"train": train, split: train}, {})
        assert not (tmp_path / "bad.h5").exists()


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


def test_prepare_cifar10_end_to_end(tmp_path):
    archive, batches, test_batch = make_cifar_archive(tmp_path / "served")
    url = archive.as_uri()
    local = D.download([url], tmp_path / "dl" / archive.name, md5=md5_of(archive))
    provenance = {"url": url, "md5": md5_of(archive)}
    out = tmp_path / "cifar10.h5"
    D.prepare_cifar10(local, out, val_fraction=0.2, split_seed=5, provenance=provenance)

    x_all = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    y_all = np.concatenate([b[b"labels"] for b in batches])
    arrays = h5_arrays(out)
    assert [len(arrays[f"{s}/labels"]) for s in D.SPLITS] == [24, 6, 8]
    for split in ("train", "val"):
        idx = arrays[f"{split}/source_index"]
        assert np.array_equal(arrays[f"{split}/images"], x_all[idx])
        assert np.array_equal(arrays[f"{split}/labels"], y_all[idx])
    assert sorted(np.concatenate([arrays["train/source_index"], arrays["val/source_index"]])) == (
        list(range(30))
    )
    x_test, y_test = D.read_split(out, "test")
    assert x_test.shape == (8, 3, 32, 32) and y_test.tolist() == test_batch[b"labels"]
    assert torch.equal(
        x_test[3], torch.from_numpy(test_batch[b"data"][3]).float().view(3, 32, 32) / 255
    )

    attrs = D.read_attrs(out)
    assert attrs["class_names"] == CLASS_NAMES and attrs["provenance"] == provenance
    assert attrs["val_fraction"] == 0.2 and attrs["split_seed"] == 5
    assert attrs["archive_sha256"] == sha256_of(archive)
    assert leftovers(tmp_path) == []

    again = tmp_path / "again.h5"
    D.prepare_cifar10(local, again, val_fraction=0.2, split_seed=5, provenance=provenance)
    assert all(np.array_equal(v, h5_arrays(again)[k]) for k, v in arrays.items())
    other = tmp_path / "other.h5"
    D.prepare_cifar10(local, other, val_fraction=0.2, split_seed=6, provenance=provenance)
    assert not np.array_equal(h5_arrays(other)["val/source_index"], arrays["val/source_index"])


def test_prepare_cifar10_without_test_batch_fails_and_writes_nothing(tmp_path):
    archive, _, _ = make_cifar_archive(tmp_path, test=False)
    out = tmp_path / "out" / "cifar10.h5"
    with pytest.raises(D.DataError, match="test_batch"):
        D.prepare_cifar10(archive, out, 0.1, 0, {})
    assert list(out.parent.iterdir()) == []


def test_a_gzip_archive_whose_crc_fails_is_refused_not_converted(tmp_path):
    """tarfile stops at the end-of-archive block, before gzip's CRC: a damaged stream whose
    checksum a user took from that damaged copy converted to other pixels without a word."""
    archive, _, _ = make_cifar_archive(tmp_path)
    damaged = bytearray(archive.read_bytes())
    damaged[-8] ^= 0x01  # the CRC-32 of the uncompressed data, in gzip's trailer
    archive.write_bytes(bytes(damaged))
    out = tmp_path / "out" / "cifar10.h5"
    with pytest.raises(D.DataError, match=f"{archive}: cannot extract: CRC check failed"):
        D.prepare_cifar10(archive, out, 0.1, 0, {})
    assert leftovers(out.parent) == []


def test_prepare_cifar10_refuses_a_negative_label_and_writes_nothing(tmp_path):
    """It was written, and only a training or evaluation job refused it."""
    archive, _, _ = make_cifar_archive(tmp_path, first_label=-1)
    out = tmp_path / "out" / "cifar10.h5"
    with pytest.raises(D.DataError, match="test_batch: label -1 is negative"):
        D.prepare_cifar10(archive, out, 0.1, 0, {})
    assert list(out.parent.iterdir()) == []


def test_prepare_cifar10_refuses_a_pickle_that_runs_code(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (os.getcwd, ())

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("data_batch_1", "test_batch"):
            add_bytes(tar, f"cifar-10-batches-py/{name}", pickle.dumps({b"data": Sneaky()}))
    with pytest.raises(D.DataError, match="data_batch_1.*not allowed"):
        D.prepare_cifar10(archive, tmp_path / "c.h5", 0.1, 0, {})


# --------------------------------------------------------------------------------------------
# BSDS500
# --------------------------------------------------------------------------------------------


def expected_bsds(payload: bytes, size: tuple[int, int]) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    if image.shape[0] > image.shape[1]:
        image = image.transpose(1, 0, 2)
    top, left = (image.shape[0] - size[0]) // 2, (image.shape[1] - size[1]) // 2
    return image[top : top + size[0], left : left + size[1]].transpose(2, 0, 1)


def test_prepare_bsds500_end_to_end(tmp_path):
    archive, files = make_bsds_archive(tmp_path / "served")
    dead = (tmp_path / "dead.tgz").as_uri()
    local = D.download([dead, archive.as_uri()], tmp_path / archive.name, sha256=sha256_of(archive))
    out = tmp_path / "bsds500.h5"
    size = (10, 14)
    D.prepare_bsds500(local, out, size, provenance={"url": archive.as_uri()})

    attrs = D.read_attrs(out)
    for split, contents in files.items():
        names = sorted(contents)
        assert attrs["file_names"][split] == names
        x, y = D.read_split(out, split)
        assert y is None and x.shape == (len(names), 3, *size)
        stored = h5_arrays(out)[f"{split}/images"]
        for i, name in enumerate(names):
            assert np.array_equal(stored[i], expected_bsds(contents[name], size)), name
    assert attrs["transposed"] == {"train": ["c_portrait.jpg"], "val": [], "test": ["t_2.jpg"]}
    assert attrs["size"] == [10, 14] and attrs["source"] == "bsds500"
    assert leftovers(tmp_path) == []


def test_prepare_bsds500_refuses_images_smaller_than_the_crop(tmp_path):
    archive, _ = make_bsds_archive(tmp_path)
    with pytest.raises(D.DataError, match=r"a_1.jpg: image is 10x14.*smaller than 11x14"):
        D.prepare_bsds500(archive, tmp_path / "b.h5", (11, 14), {})
    assert not (tmp_path / "b.h5").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# synthetic classification and smoke photographs
# --------------------------------------------------------------------------------------------


def test_synthetic_set_is_deterministic_and_balanced(tmp_path):
    kwargs = dict(n_train=200, n_val=50, n_test=100, num_classes=10, image_size=32, noise=0.1)
    D.make_synthetic_classification(tmp_path / "a.h5", seed=1, **kwargs)
    D.make_synthetic_classification(tmp_path / "b.h5", seed=1, **kwargs)
    D.make_synthetic_classification(tmp_path / "c.h5", seed=2, **kwargs)
    a, b, c = (h5_arrays(tmp_path / f"{n}.h5") for n in "abc")
    assert all(np.array_equal(v, b[k]) for k, v in a.items())
    assert not np.array_equal(a["train/images"], c["train/images"])
    assert a["train/images"].shape == (200, 3, 32, 32) and a["train/images"].dtype == np.uint8
    for split, n in (("train", 200), ("val", 50), ("test", 100)):
        assert np.bincount(a[f"{split}/labels"], minlength=10).tolist() == [n // 10] * 10
    attrs = D.read_attrs(tmp_path / "a.h5")
    assert attrs["source"] == "synthetic" and attrs["num_classes"] == 10 and attrs["seed"] == 1
    assert a["train/images"].std() > 20  # images are not blank


def test_synthetic_set_is_learnable_by_a_linear_baseline(tmp_path):
    out = tmp_path / "s.h5"
    D.make_synthetic_classification(out, 2000, 0, 500, 10, 32, 0.1, seed=0)
    x_train, y_train = D.read_split(out, "train")
    x_test, y_test = D.read_split(out, "test")
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    means = torch.stack([x_train[y_train == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(x_test, means).argmin(1) == y_test).float().mean().item()
    assert accuracy > 0.3, accuracy  # chance is 0.1


def test_smoke_photos_hold_out_whole_photographs(tmp_path):
    from skimage import data as skdata

    size = (48, 64)
    D.make_smoke_photos(tmp_path / "a.h5", size, n_train=8, n_val=4, n_test=4, seed=0)
    D.make_smoke_photos(tmp_path / "b.h5", size, n_train=8, n_val=4, n_test=4, seed=0)
    a, b = h5_arrays(tmp_path / "a.h5"), h5_arrays(tmp_path / "b.h5")
    assert all(np.array_equal(v, b[k]) for k, v in a.items())
    attrs = D.read_attrs(tmp_path / "a.h5")
    photos = attrs["photos"]
    assert photos["val"] == photos["train"] and not set(photos["train"]) & set(photos["test"])
    assert a["test/images"].shape == (4, 3, *size)

    chelsea = skdata.chelsea()
    k, top, left = a["test/crop_origin"][0]
    assert photos["test"][k] == "chelsea"
    crop = chelsea[top : top + size[0], left : left + size[1]].transpose(2, 0, 1)
    assert np.array_equal(a["test/images"][0], crop)
    # Validation crops come from below the rows used for training, so they never overlap.
    heights = [_load_photo(name).shape[0] for name in photos["train"]]
    cut = [h - round(attrs["val_rows_fraction"] * h) for h in heights]
    for origin in a["train/crop_origin"]:
        assert origin[1] + size[0] <= cut[origin[0]]
    for origin in a["val/crop_origin"]:
        assert origin[1] >= cut[origin[0]]


def test_smoke_photos_refuse_overlapping_photo_lists(tmp_path):
    with pytest.raises(D.DataError, match="overlap"):
        D.make_smoke_photos(
            tmp_path / "x.h5", (8, 8), 1, 1, 1, 0, train_photos=("coffee",), test_photos=("coffee",)
        )
