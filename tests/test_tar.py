"""The archive writer: byte for byte what tarfile writes, for every kind of entry, without its costs."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import stat
import subprocess
import sys
import tarfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backup_before_apply as bba
from conftest import examples

KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]
# Names as os.listdir returns them: any text, undecodable bytes as surrogates.
NAMES = st.lists(st.binary(min_size=1, max_size=70).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")),
                 min_size=1, max_size=4).map(lambda parts: b"/".join(parts).decode("utf-8", "surrogateescape"))


def reference_header(entry: bba.TarEntry) -> bytes:
    info = tarfile.TarInfo(entry.name)
    info.type, info.mode, info.uid, info.gid, info.mtime = entry.kind, entry.mode, entry.uid, entry.gid, entry.mtime
    info.size, info.linkname, info.devmajor, info.devminor = entry.size, entry.linkname, entry.devmajor, entry.devminor
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


@settings(max_examples=examples(400))
@given(
    name=NAMES, kind=st.sampled_from(KINDS), mode=st.integers(0, 0o177777),
    uid=st.integers(0, 2**40), gid=st.integers(0, 2**40), mtime=st.integers(-(2**40), 2**40),
    size=st.integers(0, 2**50), linkname=st.one_of(st.just(""), NAMES), dev=st.tuples(st.integers(0, 2**20), st.integers(0, 2**20)),
)
def test_tar_header_is_what_tarfile_writes_in_gnu_format(name, kind, mode, uid, gid, mtime, size, linkname, dev):
    entry = bba.TarEntry(name, kind, mode, uid, gid, mtime, size if kind == tarfile.REGTYPE else 0, linkname, *dev)
    assert bba.tar_header(entry) == reference_header(entry)


def test_tar_header_number_beyond_base_256_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        bba.tar_header(bba.TarEntry("x", tarfile.REGTYPE, 0o644, 0, 0, 0, size=1 << 100))


class Collect(bba.StreamSink):
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data):
        self.data += data
        return len(data)


class PipeCollect(bba.StreamSink):
    """A sink with a pipe fd, so that big files go through sendfile, drained on a thread."""

    def __init__(self) -> None:
        read_end, self.fd = os.pipe()
        self.data = bytearray()
        self.thread = threading.Thread(target=self._drain, args=(read_end,), daemon=True)
        self.thread.start()

    def _drain(self, fd: int) -> None:
        while chunk := os.read(fd, 1 << 16):
            self.data += chunk
        os.close(fd)

    def write(self, data):
        return bba._PipeWriter(self.fd).write(data)

    def close(self) -> None:
        os.close(self.fd)
        self.thread.join()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "vol"
    (root / "sub" / ("deep" * 30)).mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "block").write_bytes(b"b" * 512)
    (root / "small.txt").write_bytes(b"hello\n" * 100)
    (root / "big.bin").write_bytes(os.urandom(bba.SMALL_FILE + 12345))
    (root / "sub" / ("deep" * 30) / ("long-name-" * 12)).write_bytes(b"deep")
    (root / "sub" / "hard").write_bytes(b"linked")
    os.link(root / "sub" / "hard", root / "hard2")
    os.symlink("small.txt", root / "link")
    os.symlink("x" * 150, root / "long-link")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "caf\udce9".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")).write_bytes(b"latin-1 name")
    os.chown(root / "sub", 70000, 70001)
    os.chmod(root / "sub", 0o2750)
    return root


def archive(tree: Path, sink: bba.StreamSink) -> bba.ArchiveStats:
    stats = bba.ArchiveStats()
    writer = bba.TarWriter(sink)
    bba.archive_from_host(writer, bba.ArchiveItem("/data", str(tree), "/data"), [], stats)
    writer.close()
    if isinstance(sink, PipeCollect):
        sink.close()
    return stats


def tarfile_stream(data: bytes) -> bytes:
    """What tarfile writes for the same members, read back from data."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as source, tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for member in source:
            tar.addfile(member, source.extractfile(member) if member.isreg() else None)
    return out.getvalue()


@pytest.mark.parametrize("sink_kind", ["buffer", "pipe"])
def test_tar_writer_stream_is_byte_for_byte_tarfile_and_holds_every_entry(tree, sink_kind):
    sink = Collect() if sink_kind == "buffer" else PipeCollect()
    stats = archive(tree, sink)
    data = bytes(sink.data)
    assert len(data) % tarfile.RECORDSIZE == 0
    assert data == tarfile_stream(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        got = {m.name: m for m in tar}
        assert tar.extractfile("data/big.bin").read() == (tree / "big.bin").read_bytes()
        long_file = "data/sub/" + "deep" * 30 + "/" + "long-name-" * 12
        assert tar.extractfile(long_file).read() == b"deep"
    assert got["data/hard2"].isreg() and got["data/sub/hard"].islnk() and got["data/sub/hard"].linkname == "data/hard2"
    assert got["data/long-link"].linkname == "x" * 150 and got["data/link"].issym()
    assert got["data/fifo"].isfifo() and got["data/null"].ischr() and (got["data/null"].devmajor, got["data/null"].devminor) == (1, 3)
    assert (got["data/sub"].uid, got["data/sub"].gid, got["data/sub"].mode) == (70000, 70001, 0o2750)
    assert "data/caf\udce9" in got and got["data/empty"].size == 0
    assert stats.members == len(got) and stats.files == sum(m.isreg() for m in got.values())
    assert stats.data_bytes == sum(m.size for m in got.values() if m.isreg())


def test_tar_writer_listing_digest_is_the_same_whatever_the_sink(tree):
    assert archive(tree, Collect()).summary() == archive(tree, PipeCollect()).summary()


@pytest.mark.parametrize("size", [100, bba.SMALL_FILE + 1000])
def test_tar_writer_file_shorter_than_its_header_is_padded_with_zeros(tmp_path, size):
    path = tmp_path / "shrinking"
    path.write_bytes(b"x" * 10)
    sink = Collect()
    writer = bba.TarWriter(sink)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert writer.add_file(bba.TarEntry("shrinking", tarfile.REGTYPE, 0o644, 0, 0, 0, size), fd) is False
    finally:
        os.close(fd)
    writer.close()
    with tarfile.open(fileobj=io.BytesIO(bytes(sink.data)), mode="r:") as tar:
        assert tar.extractfile("shrinking").read() == b"x" * 10 + b"\0" * (size - 10)


def test_archive_file_swapped_for_a_symlink_is_left_out_not_followed(tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("root:x:0:0")
    swapped = tmp_path / "vol" / "app.conf"
    swapped.parent.mkdir()
    swapped.symlink_to(secret)  # what lstat saw as a regular file is a link by the time it is opened
    stats, sink = bba.ArchiveStats(), Collect()
    writer = bba.TarWriter(sink)
    parent = os.open(swapped.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert bba._add_host_file(writer, parent, "app.conf", "vol/app.conf", {}, stats) is None
    finally:
        os.close(parent)
    writer.close()
    assert b"root:x" not in sink.data
    assert stats.warnings == ["replaced by a link or socket while archiving, left out: /vol/app.conf"]


def test_archive_file_swapped_for_a_fifo_is_left_out_without_waiting(tmp_path):
    fifo = tmp_path / "queue"
    os.mkfifo(fifo)
    stats = bba.ArchiveStats()
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert bba._add_host_file(bba.TarWriter(Collect()), parent, "queue", "queue", {}, stats) is None
    finally:
        os.close(parent)
    assert stats.warnings == ["replaced by a non-regular file while archiving, left out: /queue"]


def source_listing(root: Path) -> dict[str, str]:
    """Every entry under root by an lstat walk of its own, as archive member name -> kind."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            kind = "d" if stat.S_ISDIR(mode) else "f" if stat.S_ISREG(mode) else "l" if stat.S_ISLNK(mode) else "p" if stat.S_ISFIFO(mode) else "?"
            found["data/" + str(path.relative_to(root))] = kind
    return found


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def nothing_left_open() -> Iterator[None]:
    """Fail if a descriptor stays open, or a directory listing is left for the garbage collector to close."""
    before = open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert open_fds() == before


@pytest.fixture
def wide_tree(tmp_path: Path) -> Path:
    """Directories around a batch of 7 entries: the top with 38 (sub0 in it with 21, and sub0/inner with 9), sub1 with 7, sub2 with 6, sub3 with 8."""
    root = tmp_path / "wide"
    root.mkdir()
    for n in range(30):
        (root / f"f{n:02d}").write_bytes(b"x" * n)
    for n in range(4):
        sub = root / f"sub{n}"
        sub.mkdir()
        for m in range(20 if n == 0 else (7, 6, 8)[n - 1]):
            (sub / f"g{m:02d}").write_text(str(m))
    (root / "sub0" / "inner").mkdir()
    for m in range(9):
        (root / "sub0" / "inner" / f"h{m}").write_text("h")
    os.symlink("f01", root / "link")
    os.mkfifo(root / "fifo")
    os.link(root / "f05", root / "hard")
    (root / "z-last").mkdir()
    return root


def test_archive_directory_of_more_entries_than_a_batch_holds_every_entry_once(wide_tree, monkeypatch):
    """A directory of DIRECTORY_BATCH entries or more is walked from its open listing a batch at a time (constant memory)."""
    monkeypatch.setattr(bba, "DIRECTORY_BATCH", 7)
    sink = Collect()
    with nothing_left_open():
        stats = archive(wide_tree, sink)
    with tarfile.open(fileobj=io.BytesIO(bytes(sink.data)), mode="r:") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert len(names) == len(set(names)) == stats.members
    kinds = {m.name: "d" if m.isdir() else "f" if m.isreg() or m.islnk() else "l" if m.issym() else "p" if m.isfifo() else "?" for m in members}
    assert kinds == {"data": "d", **source_listing(wide_tree)}  # compared with the source, not with what the walk reported
    small = [name for name in names if name.startswith("data/sub2/")]
    assert small == sorted(small) and len(small) == 6  # fewer than a batch: name order, as always
    assert stats.files == 30 + 20 + 7 + 6 + 8 + 9  # the hard link is a link entry, not a second file


def test_archive_stopped_inside_a_big_directory_closes_its_listings(wide_tree, monkeypatch):
    monkeypatch.setattr(bba, "DIRECTORY_BATCH", 7)
    real_add = bba.TarWriter.add

    def failing_add(self, entry):
        if entry.name == "data/sub0/inner":  # its listing is open, inside sub0's and the top's
            raise BrokenPipeError("the compressor went away")
        return real_add(self, entry)

    monkeypatch.setattr(bba.TarWriter, "add", failing_add)
    with nothing_left_open(), pytest.raises(BrokenPipeError):
        archive(wide_tree, Collect())


def session_store(root: Path, count: int = 12_000) -> Path:
    """One directory of count empty files named as PHP's session files are."""
    root.mkdir(parents=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in range(count):
            os.close(os.open(f"sess_{n:026d}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    return root


def traced_peak(call) -> int:
    """Return the most memory Python allocated at once during call() (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_archive_memory_does_not_grow_with_a_directory(tmp_path, monkeypatch):
    """12,000 entries in one directory, held 500 at a time: what the walk allocates stays far below holding them all."""
    root = session_store(tmp_path / "sessions")

    class Null(bba.StreamSink):
        def write(self, data) -> int:
            return len(data)

    def peak_of_walk() -> int:
        writer, stats = bba.TarWriter(Null()), bba.ArchiveStats(listing=False)
        peak = traced_peak(lambda: bba.archive_from_host(writer, bba.ArchiveItem("/data", str(root), "/data"), [], stats))
        assert stats.members == 12_001
        return peak

    monkeypatch.setattr(bba, "DIRECTORY_BATCH", 500)
    batched = peak_of_walk()
    monkeypatch.setattr(bba, "DIRECTORY_BATCH", 100_000)  # the whole directory in one batch, as before batches
    whole = peak_of_walk()
    assert batched < bba.COPY_CHUNK + (256 << 10)  # the writer's 1 MiB buffer and one batch of 500 (about 60 KiB)
    assert whole > batched + (1 << 20)  # the same walk holding the 12,000 whole (about 1.5 MiB more): the test can tell


def test_gzip_threads_error_reaches_the_writer_and_never_blocks_it():
    class Full:
        def __init__(self) -> None:
            self.calls = 0

        def write(self, data):
            self.calls += 1
            if self.calls > 1:  # the gzip header goes through, the first block does not
                raise OSError(28, "No space left on device")

    gz = bba._GzipThreads(Full(), 1, 2)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(64):  # far more than the blocks in flight: the writer must not block
            gz.write(os.urandom(1 << 20))
        gz.close()


@pytest.mark.parametrize("pieces", [[], [b"x"], [b"a" * bba.GZIP_BLOCK], [os.urandom(3 * bba.GZIP_BLOCK + 17)],
                                    [b"log line %d\n" % i for i in range(300_000)]])
def test_gzip_threads_output_is_one_gzip_member_every_reader_takes(tmp_path, pieces):
    import gzip
    import subprocess
    import zlib

    class Keep:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data):
            self.data += data

    out = Keep()
    gz = bba._GzipThreads(out, 6, 3)
    for piece in pieces:
        gz.write(piece)
    gz.close()
    payload = b"".join(pieces)
    assert gzip.decompress(bytes(out.data)) == payload
    (tmp_path / "x.gz").write_bytes(out.data)
    assert subprocess.run(["gzip", "-dc", str(tmp_path / "x.gz")], capture_output=True, check=True).stdout == payload
    if len(payload) > bba.GZIP_BLOCK:  # priming each block with the one before keeps the size of a single stream
        assert len(out.data) <= len(zlib.compress(payload, 6)) * 1.01 + 64


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst"])
def test_scan_tar_counts_members_and_refuses_every_truncation(tree, tmp_path, fmt):
    import subprocess
    stats, sink = bba.ArchiveStats(), Collect()
    writer = bba.TarWriter(sink)
    bba.archive_from_host(writer, bba.ArchiveItem("/data", str(tree), "/data"), [], stats)
    writer.close()
    compress = ["gzip", "-c"] if fmt == "tar.gz" else ["zstd", "-q", "-c"]
    packed = subprocess.run(compress, input=bytes(sink.data), capture_output=True, check=True).stdout
    path = tmp_path / f"x.{fmt}"
    path.write_bytes(packed)
    with open(path, "rb") as fh:  # zstd reads the file; its output comes back through a pipe (the splice path)
        assert bba.scan_tar(fh, fmt)["members"] == stats.members
    for cut in (len(packed) // 3, len(packed) - 40, len(packed) - 4):
        path.write_bytes(packed[:cut])
        with open(path, "rb") as fh, pytest.raises(bba.BackupError, match="archive is not a complete"):
            bba.scan_tar(fh, fmt)


# The ways tars write a number field of `width` bytes: GNU tar, Go and this tool ("0000644\0"), every
# digit and no terminator (POSIX allows it), old tars' spaces ("   644 \0"), short and NUL-padded, base-256.
NUMBER_FORMS = [
    lambda value, width: b"%0*o\0" % (width - 1, value),
    lambda value, width: b"%0*o" % (width, value),
    lambda value, width: (b"%o" % value).rjust(width - 2, b" ") + b" \0",
    lambda value, width: (b"%o\0" % value).ljust(width, b"\0"),
    lambda value, width: b"\x80" + value.to_bytes(width - 1, "big"),
]
NUMBER_FIELDS = {"mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12), "mtime": (136, 12)}


def with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@settings(max_examples=examples(300))
@given(values=st.fixed_dictionaries({"mode": st.integers(0, 0o7777), "uid": st.integers(0, 8**6), "gid": st.integers(0, 8**6),
                                     "size": st.integers(0, 3000), "mtime": st.integers(0, 8**10)}),
       forms=st.lists(st.sampled_from(range(len(NUMBER_FORMS))), min_size=5, max_size=5),
       prefix=st.sampled_from(["", "p" * 150]))
def test_reader_takes_every_form_of_number_field_as_tarfile_does(values, forms, prefix):
    """The reader's fast path (octal ending in NUL or space) and its careful path give tarfile's numbers."""
    info = tarfile.TarInfo("f")
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    header[345:345 + len(prefix)] = prefix.encode()  # a long ustar prefix: more than 256 bytes that are not NUL
    for (field, (at, width)), form in zip(NUMBER_FIELDS.items(), forms):
        encoded = NUMBER_FORMS[form](values[field], width)
        header[at:at + width] = encoded if len(encoded) == width else NUMBER_FORMS[0](values[field], width)  # too long for spaces
    data = with_checksum(header) + b"d" * values["size"] + bytes(-values["size"] % 512) + bytes(1024)
    [(_, entry)] = [(r, e) for r, e in bba.tar_entries(io.BytesIO(data))]
    with tarfile.open(fileobj=io.BytesIO(data)) as reference:
        theirs = reference.getmembers()[0]
    assert {field: getattr(entry, field) for field in NUMBER_FIELDS} == values
    assert {field: getattr(theirs, field) for field in NUMBER_FIELDS} == values
    assert entry.name == (prefix + "/f" if prefix else "f")


@pytest.mark.parametrize("prefix", ["", "p" * 155], ids=["few bytes set (Adler-32)", "many bytes set (the plain sum)"])
@pytest.mark.parametrize("at", [0, 99, 130, 300, 400, 511])
@pytest.mark.parametrize("delta", [1, 7, 128])
def test_reader_refuses_a_header_whose_checksum_does_not_match(prefix, at, delta):
    header = bytearray(tarfile.TarInfo("some/file").tobuf(tarfile.USTAR_FORMAT))
    header[345:345 + len(prefix)] = prefix.encode()
    good = with_checksum(header)
    assert [e.name for _, e in bba.tar_entries(io.BytesIO(good + bytes(1024)))]
    bad = bytearray(good)
    bad[at] = (bad[at] + delta) % 256
    with pytest.raises(bba.BackupError, match="tar header 1 has a bad checksum"):
        list(bba.tar_entries(io.BytesIO(bytes(bad) + bytes(1024))))


def test_empty_directory_removes_a_directory_of_many_entries_a_batch_at_a_time(wide_tree, monkeypatch):
    """--restore empties a mount before extracting into it: a batch of names at a time, listed again each time, never the whole directory."""
    monkeypatch.setattr(bba, "DIRECTORY_BATCH", 7)
    (wide_tree / "nested-mount" / "its-own").mkdir(parents=True)  # another mount's mount point: its contents are left alone
    (wide_tree / "nested-mount" / "its-own" / "data").write_text("kept")
    top, listed = wide_tree.stat().st_ino, []
    real_scandir = os.scandir

    def counting_scandir(target):
        if isinstance(target, int) and os.fstat(target).st_ino == top:
            listed.append(target)
        return real_scandir(target)

    monkeypatch.setattr(bba.os, "scandir", counting_scandir)
    with nothing_left_open():
        bba.empty_directory(str(wide_tree), ["nested-mount/its-own"])
    monkeypatch.undo()
    assert os.listdir(wide_tree) == ["nested-mount"] and (wide_tree / "nested-mount" / "its-own" / "data").read_text() == "kept"
    assert len(listed) == 7  # 38 entries to remove (the nested mount point stays): six batches of 7 or fewer, then an empty listing


def test_empty_directory_keeps_nested_mount_points_at_any_depth_and_empties_the_way_to_them(tmp_path):
    """A mount with mounts nested in it (/data, /data/top-mnt, /data/deep/er/mnt): each nested one is restored on its own."""
    root = tmp_path / "mount"
    for path, text in {"top-mnt/inside": "kept", "deep/x": "added", "deep/er/y": "added", "deep/er/mnt/data": "kept",
                       "deep/er/z/w": "added", "other/f": "added", "f": "added"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    with nothing_left_open():
        bba.empty_directory(str(root), ["top-mnt", "deep/er/mnt/"])
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "deep", "deep/er", "deep/er/mnt", "deep/er/mnt/data", "top-mnt", "top-mnt/inside"]
    assert (root / "deep/er/mnt/data").read_text() == "kept" and (root / "top-mnt/inside").read_text() == "kept"


def test_empty_directory_that_cannot_be_emptied_fails_instead_of_looping(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "stuck").write_text("x")
    monkeypatch.setattr(bba.os, "unlink", lambda name, dir_fd=None: None)  # as if something put it back at once
    with nothing_left_open(), pytest.raises(bba.BackupError, match=f"^{tmp_path}/sub/stuck is still there after it was removed"):
        bba.empty_directory(str(tmp_path), [])


def test_remove_entry_says_which_entry_cannot_be_removed(tmp_path, monkeypatch):
    (tmp_path / "top" / "a" / "busy").mkdir(parents=True)
    (tmp_path / "top" / "a" / "busy" / "f").write_text("x")
    real_rmdir = os.rmdir

    def rmdir(name, dir_fd=None):
        if name == "busy":
            raise OSError(16, "Device or resource busy")  # a mount point nobody said was one
        real_rmdir(name, dir_fd=dir_fd)

    monkeypatch.setattr(bba.os, "rmdir", rmdir)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with nothing_left_open(), pytest.raises(bba.BackupError, match=f"^cannot remove {tmp_path}/top/a/busy: Device or resource busy$"):
            bba.remove_entry(parent, "top")
    finally:
        os.close(parent)
    assert os.listdir(tmp_path / "top" / "a" / "busy") == []


def test_remove_entry_removes_a_tree_deeper_than_the_recursion_limit_and_never_follows_a_link(tmp_path):
    """A tree of 1,500 levels more than the recursion limit (shutil.rmtree recurses: RecursionError at about 1,000 on Python 3.11)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not part of the tree")
    depth = sys.getrecursionlimit() + 1500
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            if level % 100 == 0:
                os.close(os.open(f"file-{level}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
                os.mkfifo(f"fifo-{level}", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.symlink(str(outside), "link-to-outside", dir_fd=fd)
        os.symlink(str(outside / "keep"), "link-to-a-file", dir_fd=fd)
    finally:
        os.close(fd)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with nothing_left_open():
            bba.remove_entry(parent, "d")
            bba.remove_entry(parent, "d")  # gone already: fine
    finally:
        os.close(parent)
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)  # if the test failed: pytest's own clean-up recurses too
    assert sorted(os.listdir(tmp_path)) == ["fifo-0", "file-0", "outside"]  # what sat beside the tree's top
    assert (outside / "keep").read_text() == "not part of the tree"


def test_remove_entry_holds_a_batch_of_a_subdirectory_not_the_whole(tmp_path, monkeypatch):
    """--restore removes a mount's subdirectories, --prune and the clean-up staging trees: a batch of names at a time, at every level."""
    def peak_of_removal(batch: int) -> int:
        sessions = session_store(tmp_path / "top" / "sessions")
        (sessions / "nested").mkdir()
        for n in range(30):
            (sessions / "nested" / f"n{n}").write_text("n")
        monkeypatch.setattr(bba, "DIRECTORY_BATCH", batch)
        parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            peak = traced_peak(lambda: bba.remove_entry(parent, "top"))
        finally:
            os.close(parent)
        assert os.listdir(tmp_path) == []
        return peak

    batched = peak_of_removal(500)
    whole = peak_of_removal(100_000)  # the 12,000 names in one batch, as shutil.rmtree holds a directory
    assert batched < 256 << 10  # one batch of 500 names (about 60 KiB)
    assert whole > batched + (1 << 20)  # the same removal holding the whole directory (about 1.5 MiB more): the test can tell


def find_file_bytes(root: Path) -> tuple[int, set[int]]:
    """What the estimate must say, by GNU find: every regular file on root's filesystem once, its data (not its holes); and their inodes."""
    out = subprocess.run(["find", str(root), "-xdev", "-type", "f", "-printf", r"%D %i %s %b\n"], capture_output=True, check=True).stdout
    files = {}
    for line in out.decode().splitlines():
        dev, ino, size, blocks = map(int, line.split())
        files[dev, ino] = min(size, blocks * 512)
    return sum(files.values()), {ino for _, ino in files}


def test_space_estimate_without_du_counts_what_find_counts_at_any_depth(tmp_path, monkeypatch):
    """The estimate where du is missing: a file past 4,096 bytes of path, holes, hard links, links out, a nested filesystem, a big directory."""
    root = tmp_path / "mount"
    (root / "many").mkdir(parents=True)
    for n in range(30):
        (root / "many" / f"f{n:02d}").write_bytes(os.urandom(100 * n))
    with open(root / "sparse", "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(10 << 20)
        fh.write(os.urandom(1 << 20))
    os.link(root / "many" / "f29", root / "hard")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(2 << 20))
    os.symlink(outside, root / "link-out")
    os.symlink(outside / "big", root / "link-to-a-file")
    deep = str(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(500):  # 5,000 bytes of path under the mount: the old walk, by path strings, skipped what lies past 4,096
            os.mkdir("level-dir", dir_fd=fd)
            child = os.open("level-dir", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            deep += "/level-dir"
            if level in (250, 499):
                with open(os.open(f"data-{level}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd), "wb") as fh:
                    fh.write(os.urandom(64 << 10))
        deep_inode = os.stat("data-499", dir_fd=fd).st_ino
    finally:
        os.close(fd)
    assert len(deep) - len(str(root)) > 4096
    nested = root / "nested-mount"
    nested.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(nested)], capture_output=True).returncode == 0
    try:
        (nested / "elsewhere").write_bytes(os.urandom(3 << 20))  # on a filesystem of its own: measured as a mount of its own, as du -x does
        expected, inodes = find_file_bytes(root)
        assert deep_inode in inodes and expected > (1 << 20) + 2 * (64 << 10)
        monkeypatch.setattr(bba, "du_argv", lambda paths: None)
        monkeypatch.setattr(bba, "DIRECTORY_BATCH", 7)
        with nothing_left_open():
            assert bba.tree_size(str(root)) == expected
            assert bba.tree_size(str(tmp_path / "gone")) == 0
    finally:
        if mounted:
            subprocess.run(["umount", str(nested)], check=True)
        subprocess.run(["rm", "-rf", str(root)], check=True)  # pytest's own clean-up recurses, with paths over 4,096 bytes
