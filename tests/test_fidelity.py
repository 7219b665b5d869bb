"""Archives as faithful as GNU tar: xattrs, ACLs, capabilities, holes, sockets, old mtimes, deep paths.

Each archive is restored with GNU tar (--xattrs --xattrs-include='*' --acls, as the restore
notes say) and compared with the source by a walk written here, apart from the tool: owners,
modes, mtimes, contents, link targets, xattrs and allocated blocks.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

import backup_before_apply as bba

MiB = 1 << 20
# security.capability of `setcap cap_net_raw+ep` (VFS_CAP_REVISION_2, permitted and effective)
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """system.posix_acl_* as the kernel stores it: version 2, then (tag, perm, id) per entry."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


ANY = 0xFFFFFFFF
ACCESS_ACL = posix_acl((0x01, 6, ANY), (0x02, 7, 1234), (0x04, 4, ANY), (0x10, 7, ANY), (0x20, 4, ANY))
DEFAULT_ACL = posix_acl((0x01, 7, ANY), (0x02, 5, 99), (0x04, 5, ANY), (0x10, 5, ANY), (0x20, 5, ANY))
DEEP_NAME = "d" * 200


def make_sparse(path: Path, size: int, regions: list[tuple[int, int]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        for offset, length in regions:
            os.pwrite(fd, os.urandom(length), offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return build_tree(tmp_path / "vol")


def build_tree(root: Path, *, deep: bool = True) -> Path:
    """A volume as services leave it: xattrs of every namespace, ACLs, a capability, holes, odd names, deep paths."""
    (root / "d").mkdir(parents=True)
    os.setxattr(root / "d", "system.posix_acl_default", DEFAULT_ACL)
    os.setxattr(root / "d", "user.dir", b"on a directory")
    f = root / "d" / "f"
    f.write_bytes(b"a binary that needs a raw socket\n")
    os.setxattr(f, "user.foo", b"bar")
    os.setxattr(f, "trusted.t", b"x\x01y\xff")
    os.setxattr(f, "security.capability", CAP_NET_RAW)
    os.setxattr(f, "system.posix_acl_access", ACCESS_ACL)
    make_sparse(root / "sparse", 300 * MiB, [(200 * MiB, MiB)])
    make_sparse(root / "tail-hole", 64 * MiB, [(0, 8192)])
    make_sparse(root / "all-hole", 5 * MiB, [])
    make_sparse(root / "many-holes", 40 * MiB, [(i * MiB, 5000) for i in range(30)])  # more than 25 regions: extension blocks
    make_sparse(root / "ends-in-data", 9 * MiB, [(4 * MiB, 4096), (9 * MiB - 4096, 4096)])
    (root / "dense").write_bytes(os.urandom(70000))
    os.symlink("d/f", root / "link")
    os.setxattr(root / "link", "trusted.on-link", b"the link's own", follow_symlinks=False)
    os.link(root / "dense", root / "dense-again")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    for name in ("new\nline", "caf\udce9", "sp ace", "back\\slash", "*[glob]?"):
        (root / name).write_bytes(name.encode("utf-8", "surrogateescape"))
    (root / "old").write_bytes(b"before 1970")
    os.utime(root / "old", ns=(-1_500_000_000, -1_500_000_000))  # 1.5 s before the epoch: GNU tar stores -2
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "s.sock"))
    if deep:
        build_deep_path(root)
    os.chown(root / "d", 70000, 70001)
    return root


def build_deep_path(root: Path) -> None:
    """A path of 4,070 bytes in the container, over 4096 bytes on this host with the volume's prefix."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    length = 0
    while length < 4060 - len("/leaf"):
        name = DEEP_NAME[:min(len(DEEP_NAME), 4060 - len("/leaf") - length - 1)] or "d"
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd, length = child, length + len(name) + 1
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
    os.write(leaf, b"deep")
    os.close(leaf)
    os.close(fd)
    assert len(str(root)) + length + len("/leaf") > 4096


def walk(root: Path) -> dict[str, tuple]:
    """Every entry under root by an lstat walk on directory fds: what a faithful restore must give back."""
    found: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        base = os.path.relpath(dirpath, root)
        names = [(os.path.basename(dirpath), os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dirfd), base)]
        names += [(name, dirfd, os.path.normpath(os.path.join(base, name))) for name in dirnames + filenames]
        for name, parent, rel in names:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            xattrs = tuple(sorted((k, os.getxattr(f"/proc/self/fd/{parent}/{name}", k, follow_symlinks=False))
                                  for k in os.listxattr(f"/proc/self/fd/{parent}/{name}", follow_symlinks=False)))
            detail: object = None
            if stat.S_ISREG(kind):
                key = (st.st_dev, st.st_ino)
                if key in inodes:
                    detail = ("hard link", inodes[key])
                else:
                    inodes[key] = rel
                    fd = os.open(name, os.O_RDONLY, dir_fd=parent)
                    digest = hashlib.sha256()
                    with os.fdopen(fd, "rb") as fh:
                        while chunk := fh.read(MiB):
                            digest.update(chunk)
                    detail = (st.st_size, st.st_blocks, digest.hexdigest())
            elif stat.S_ISLNK(kind):
                detail = os.readlink(name, dir_fd=parent)
            elif stat.S_ISCHR(kind):
                detail = st.st_rdev
            mtime = None if stat.S_ISDIR(kind) or stat.S_ISLNK(kind) else st.st_mtime_ns // 1_000_000_000
            found[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, detail, xattrs)
            if parent != dirfd:
                os.close(parent)
    return found


def write(root: Path, fmt: str, path: Path) -> bba.ArchiveStats:
    stats = bba.ArchiveStats()
    compress = ["gzip", "-c"] if fmt == "tar.gz" else ["zstd", "-q", "-c"]
    with open(path, "wb") as out, subprocess.Popen(compress, stdin=subprocess.PIPE, stdout=out) as proc:
        assert proc.stdin is not None

        class Sink(bba.StreamSink):
            def write(self, data):
                proc.stdin.write(data)
                return len(data)

        writer = bba.TarWriter(Sink())
        bba.archive_from_host(writer, bba.ArchiveItem("/data", str(root), "/data"), [], stats)
        writer.close()
        proc.stdin.close()
    assert proc.returncode == 0
    return stats


def listing(root: Path) -> dict:
    stats = bba.ArchiveStats()

    class Null(bba.StreamSink):
        def write(self, data):
            return len(data)

    bba.archive_from_host(bba.TarWriter(Null()), bba.ArchiveItem("/data", str(root), "/data"), [], stats)
    return stats.summary()["/data"]


def gnu_restore(archive: Path, into: Path) -> None:
    into.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-xpf", str(archive), "-C", str(into)],
                   check=True, capture_output=True)


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst"])
def test_gnu_tar_restores_everything_that_was_there(source, tmp_path, fmt):
    archive = tmp_path / f"a.{fmt}"
    stats = write(source, fmt, archive)
    gnu_restore(archive, tmp_path / "out")
    before, after = walk(source), walk(tmp_path / "out" / "data")
    assert before.pop("s.sock")[0] == stat.S_IFSOCK and "s.sock" not in after  # left out, as GNU tar leaves it
    assert after == before
    assert after["d/f"][6] == tuple(sorted({"user.foo": b"bar", "trusted.t": b"x\x01y\xff", "security.capability": CAP_NET_RAW,
                                            "system.posix_acl_access": ACCESS_ACL}.items()))
    assert after["sparse"][5][1] * 512 < 2 * MiB  # still sparse: 300 MiB apparent, 1 MiB of data
    assert after["old"][4] == -2
    assert stats.sockets == 1 and "socket ignored: /data/s.sock" in stats.warnings


def test_what_the_archive_stores_is_what_gnu_tar_stores(source, tmp_path):
    ours = tmp_path / "ours.tar.gz"
    write(source, "tar.gz", ours)
    theirs = tmp_path / "theirs.tar"
    done = subprocess.run(["tar", "--numeric-owner", "--sparse", "--format=gnu", "-C", str(source), "--transform=s,^\\.,data,",
                           "-cf", str(theirs), "."], capture_output=True)
    assert b"socket ignored" in done.stderr
    with open(ours, "rb") as fh, bba.decompressing(fh, "tar.gz") as raw:
        mine = {entry.name: entry for _, entry in bba.tar_entries(raw)}
    with open(theirs, "rb") as raw_gnu:
        gnu = {entry.name: entry for _, entry in bba.tar_entries(raw_gnu)}
    # GNU tar keeps xattrs in POSIX format only (test_python_tarfile_... checks their records); in GNU format
    # its sparse maps, sizes, times and modes must be ours.
    assert set(mine) == set(gnu)
    for name, entry in gnu.items():
        if tarfile.LNKTYPE in (entry.kind, mine[name].kind):  # which name of a hard-linked file comes first is walk order
            continue
        assert (mine[name].kind, mine[name].size, mine[name].sparse, mine[name].mtime, mine[name].mode) == \
               (entry.kind, entry.size, entry.sparse, entry.mtime, entry.mode), name


def test_python_tarfile_reads_every_entry_and_hole(source, tmp_path):
    archive = tmp_path / "a.tar.gz"
    write(source, "tar.gz", archive)
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar}
        assert members["data/sparse"].issparse() and members["data/sparse"].size == 300 * MiB
        data = tar.extractfile(members["data/many-holes"]).read()
    assert data == (source / "many-holes").read_bytes()
    assert members["data/d/f"].pax_headers["SCHILY.xattr.user.foo"] == "bar"
    assert members["data/d/f"].pax_headers["SCHILY.acl.access"] == "user::rw-\nuser:1234:rwx\ngroup::r--\nmask::rwx\nother::r--\n"


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst"])
def test_scan_reads_back_the_listing_the_writer_counted(source, tmp_path, fmt):
    archive = tmp_path / f"a.{fmt}"
    stats = write(source, fmt, archive)
    with open(archive, "rb") as fh:
        assert bba.scan_tar(fh, fmt, groups=["/data"])["per_mount"] == stats.summary()


def test_listing_digest_of_a_faithful_restore_matches_and_sees_a_lost_xattr_or_hole(source, tmp_path):
    archive = tmp_path / "a.tar.gz"
    write(source, "tar.gz", archive)
    gnu_restore(archive, tmp_path / "out")
    restored = tmp_path / "out" / "data"
    assert listing(restored) == listing(source)
    os.removexattr(restored / "d" / "f", "security.capability")
    assert listing(restored)["listing_sha256"] != listing(source)["listing_sha256"]
    os.setxattr(restored / "d" / "f", "security.capability", CAP_NET_RAW)
    assert listing(restored) == listing(source)
    (restored / "tail-hole").write_bytes((source / "tail-hole").read_bytes())  # the same bytes, holes filled
    assert listing(restored)["listing_sha256"] != listing(source)["listing_sha256"]


def test_verify_fails_an_archive_whose_entries_are_not_those_recorded(source, tmp_path):
    archive = tmp_path / "a.tar.gz"
    stats = write(source, "tar.gz", archive)
    recorded = {"destination": "/data", **stats.summary()["/data"]}
    doc = {"format": "tar.gz", "verification": {"members": stats.members}, "mounts": [recorded], "archived_paths": ["/data"]}
    with open(archive, "rb") as fh:
        assert all(passed for _, passed, _ in bba.verify_archive(fh, doc))
    recorded["listing_sha256"] = "0" * 64
    with open(archive, "rb") as fh:
        checks = {name: (passed, detail) for name, passed, detail in bba.verify_archive(fh, doc)}
    assert checks["listing"][0] is False and "/data: listing_sha256" in checks["listing"][1]


def test_space_estimate_counts_data_not_holes(source):
    assert bba.tree_size(str(source)) < 20 * MiB  # 420 MiB apparent


class Trickle(io.RawIOBase):
    """A pipe that hands over a few bytes at a time, as docker cp's stdout does."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.data.read(min(len(buffer), 7))
        buffer[:len(chunk)] = chunk
        return len(chunk)


def test_reader_takes_a_stream_that_trickles_in(source, tmp_path):
    archive = tmp_path / "a.tar.gz"
    stats = write(source, "tar.gz", archive)
    with open(archive, "rb") as fh, bba.decompressing(fh, "tar.gz") as raw:
        data = raw.read()
    counted = bba.ArchiveStats()
    for reader, entry in bba.tar_entries(Trickle(data)):
        counted.count("/data", entry)
        if entry.name == "data/dense":
            assert reader.read(1 << 20) == (source / "dense").read_bytes()
    assert counted.summary() == stats.summary()


def test_reader_takes_pax_streams_as_docker_cp_sends_them():
    """Go's archive/tar (docker cp): pax path records, ustar prefixes, SCHILY.xattr records."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in (("a/" + "n" * 150, b"x", {}), ("p" * 90 + "/" + "q" * 60, b"yy", {}),
                                ("bin", b"z", {"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("utf-8", "surrogateescape")})):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.pax_headers = len(data), -1.5, pax
            tar.addfile(info, io.BytesIO(data))
    out.seek(0)
    got = {entry.name: (entry, reader.read(10)) for reader, entry in bba.tar_entries(out)}
    assert got["a/" + "n" * 150][1] == b"x" and got["p" * 90 + "/" + "q" * 60][1] == b"yy"
    assert got["bin"][0].xattrs == {"security.capability": CAP_NET_RAW} and got["bin"][0].mtime == -2
