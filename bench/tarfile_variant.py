#!/usr/bin/env python3
"""The tool with a part swapped, for `make bench` only: a hand-written part for the standard library's, or its verification taken out.

BENCH_SWAP names what is swapped, comma-separated:
- writer: the archive is written by tarfile (TarFile.add into the same compressor), not TarWriter;
- reader: the in-flight verification reads the archive back with tarfile, not TarReader;
- gzipfile: gzip is one gzip.GzipFile (one thread), not the threaded deflate (BBA_GZIP_TOOL=zlib);
- verification: no in-flight verification at all; the writer's own counts and listing digest
  stand for what the archive holds. The tool never does this: it measures what the proof costs.
Everything else is the tool's own code: the same command line, docker calls, free-space check,
listing digests, hash, fsync and manifest. The tool is compiled from its source on every run, as
`python3 backup_before_apply.py` compiles it (an import would load cached bytecode and start
faster than the tool it is compared with). Never shipped as the product.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import sys
import tarfile
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def load_tool() -> types.ModuleType:
    """The tool's module, compiled from its source as a script run compiles it (no cached bytecode)."""
    path = Path(__file__).resolve().parent.parent / "backup_before_apply.py"
    module = types.ModuleType("backup_before_apply")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)  # noqa: S102 - the tool's own source
    return module


if typing.TYPE_CHECKING:
    import backup_before_apply as bba
else:
    bba = load_tool()


def entry_of(info: tarfile.TarInfo, name: str) -> bba.TarEntry:
    kind = tarfile.REGTYPE if info.isreg() else info.type
    return bba.TarEntry(name, kind, info.mode & 0o7777, info.uid, info.gid, int(info.mtime), info.size if info.isreg() else 0,
                        info.linkname, info.devmajor, info.devminor)


class _Out:
    """tarfile's file object: every write goes through the TarWriter's sink (flushing what it holds first)."""

    def __init__(self, tar: bba.TarWriter) -> None:
        self.tar = tar

    def tell(self) -> int:
        return self.tar.offset + len(self.tar.buffer)

    def write(self, data: bytes) -> int:
        self.tar.flush()
        self.tar.sink.write(data)
        self.tar._done(len(data))
        return len(data)


def archive_from_host(tar: bba.TarWriter, item: bba.ArchiveItem, nested: list[str], stats: bba.ArchiveStats,
                      rules: bba.ArchiveRules | None = None) -> None:
    assert item.host is not None and not item.rel and not nested, "the bench archives one whole mount"
    # Not closed: TarWriter.close() writes the end of the archive. tarfile keeps a TarInfo per file it adds.
    out = tarfile.open(fileobj=_Out(tar), mode="w:", format=tarfile.GNU_FORMAT)  # type: ignore[call-overload]  # noqa: SIM115

    def numeric(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        info.uname = info.gname = ""
        stats.count(item.group, entry_of(info, info.name.rstrip("/")))
        return info

    out.add(item.host, arcname=item.path.strip("/"), filter=numeric)
    out.fileobj = None  # so that nothing of tarfile writes after this


def scan_tar(fh: IO[bytes], fmt: str = "tar.gz", *, rdb: Any = None, keep: Any = None, groups: list[str] | None = None) -> dict[str, Any]:
    stats = bba.ArchiveStats()
    grouping = bba.ArchiveGroups(groups or [])
    members = 0
    with bba.decompressing(fh, fmt) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for info in tar:
            members += 1
            name = info.name.rstrip("/")
            stats.count(grouping.of(name), entry_of(info, name))
            tar.members.clear()  # type: ignore[attr-defined]
        while raw.read(bba.COPY_CHUNK):
            pass
    result: dict[str, Any] = {f"{bba.compression_of(fmt)}_complete": True, "tar_readable": True, "members": members}
    if groups is not None:
        result["per_mount"] = stats.summary()
    return result


class _GzipFileSink(bba.StreamSink):
    def __init__(self, out: Any, level: int) -> None:
        self.gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self.gz.write(data)


real_compressing = bba.compressing


@contextlib.contextmanager
def compressing(out: Any, compression: bba.Compression) -> Iterator[bba.StreamSink]:
    if compression.format != "gzip" or compression.tool != "zlib":
        with real_compressing(out, compression) as sink:
            yield sink
        return
    sink = _GzipFileSink(out, compression.level)
    yield sink
    sink.gz.close()


written: list[bba.ArchiveStats] = []
real_archive_items = bba.archive_items


def archive_items(tar: bba.TarWriter, container: str, items: list[bba.ArchiveItem], skipped: list[str], stats: bba.ArchiveStats,
                  rules: bba.ArchiveRules) -> None:
    stats.listing = True  # the listing digest the read-back would have taken, from the writer instead
    written.append(stats)
    real_archive_items(tar, container, items, skipped, stats, rules)


@contextlib.contextmanager
def verifying(out: Any, scan: Any) -> Iterator[Any]:
    def as_written() -> dict[str, Any]:
        return {"verification": "none (bench)", "members": written[-1].members, "per_mount": written[-1].summary()}

    yield as_written


def main() -> int:
    swapped = {part for part in os.environ.get("BENCH_SWAP", "").split(",") if part}
    if "writer" in swapped:
        bba.archive_from_host = archive_from_host  # type: ignore[assignment]
    if "reader" in swapped:
        bba.scan_tar = scan_tar  # type: ignore[assignment]
    if "gzipfile" in swapped:
        bba.compressing = compressing  # type: ignore[assignment]
    if "verification" in swapped:
        bba.archive_items = archive_items
        bba.verifying = verifying  # type: ignore[assignment]
    return bba.main(sys.argv[1:])


if __name__ == "__main__":
    bba.exit_now(main())  # as the tool ends: output flushed, no interpreter teardown
