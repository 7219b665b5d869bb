"""Reads confined to the mount, and the small decisions behind "no silent loss", without an engine.

The walk goes by directory file descriptors: a symlink the container planted, a directory
it swaps for a link mid-walk, a path longer than the host allows, the backup directory
inside a mount: none of them may put a host file (or the backup itself) into the archive.
"""

from __future__ import annotations

import array
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backup_before_apply as bba
from conftest import examples, fake_container


class Collect(bba.StreamSink):
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data) -> int:
        self.data += data
        return len(data)


def archive(item: bba.ArchiveItem, rules: bba.ArchiveRules | None = None, nested=()) -> tuple[dict[str, tarfile.TarInfo], bba.ArchiveStats]:
    sink, stats = Collect(), bba.ArchiveStats()
    writer = bba.TarWriter(sink)
    bba.archive_from_host(writer, item, list(nested), stats, rules)
    writer.close()
    with tarfile.open(fileobj=io.BytesIO(bytes(sink.data))) as tar:
        return {m.name: m for m in tar.getmembers()}, stats


@pytest.fixture
def host_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "host" / "etc"
    secret.mkdir(parents=True)
    (secret / "shadow").write_text("root:HOST-SECRET")
    return secret


def test_locate_a_service_path_through_a_symlink_in_the_mount_is_read_in_the_container(tmp_path, host_secret):
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "sub").symlink_to(host_secret)  # planted by the container: on this host it points at host files
    (volume / "real").mkdir()
    mount = bba.MountPlan("/data", "volume", str(volume), "v", "host")
    through_link = bba.locate("/data/sub/shadow", [mount])
    assert through_link.host is None and through_link.rel == ("sub", "shadow")  # docker cp resolves it inside the container
    plain = bba.locate("/data/real/dump.rdb", [mount])
    assert plain.host == str(volume) and plain.rel == ("real", "dump.rdb")
    assert bba.locate("/elsewhere/dump.rdb", [mount]).host is None


def test_archive_a_planted_symlink_is_archived_as_a_link_never_followed(tmp_path, host_secret):
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "etc").symlink_to(host_secret)
    (volume / "ok").write_text("ok")
    members, _ = archive(bba.ArchiveItem("/data", str(volume), "/data"))
    assert members["data/etc"].issym() and members["data/etc"].linkname == str(host_secret)
    assert "data/etc/shadow" not in members and b"HOST-SECRET" not in b"".join(m.name.encode() for m in members.values())


def test_archive_a_directory_swapped_for_a_symlink_between_listing_and_open_is_left_out(tmp_path, host_secret, monkeypatch):
    volume = tmp_path / "volume"
    (volume / "b").mkdir(parents=True)
    (volume / "a").write_text("a")
    real_entries = bba._entries

    def swapping_entries(fd):
        found = real_entries(fd)
        if ("b", "d") in found:
            os.rmdir(volume / "b")
            os.symlink(host_secret, volume / "b")  # the container wins the race: listed as a directory, now a link
        return found

    monkeypatch.setattr(bba, "_entries", swapping_entries)
    members, stats = archive(bba.ArchiveItem("/data", str(volume), "/data"))
    monkeypatch.undo()
    assert "data/b/shadow" not in members and "data/b" not in members
    assert stats.warnings == ["replaced by a link or a file while archiving, left out: /data/b"]


def test_archive_a_path_longer_than_the_host_allows_is_archived_whole(tmp_path):
    """4,500 bytes inside the mount: a walk by path strings fails with ENAMETOOLONG on the host."""
    volume = tmp_path / "volume"
    volume.mkdir()
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while depth * 201 < 4500:
            name = f"{depth:0200d}"
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            depth += 1
        leaf = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
    finally:
        os.close(fd)
    members, stats = archive(bba.ArchiveItem("/data", str(volume), "/data"))
    deepest = max(members, key=len)
    assert deepest.endswith("/leaf.txt") and len(str(volume)) + len(deepest) > 4096 and len(members) == depth + 2
    assert stats.files == 1 and stats.warnings == []


def test_archive_the_backup_directory_inside_a_mount_is_left_out(tmp_path):
    volume = tmp_path / "volume"
    (volume / "backups").mkdir(parents=True)
    (volume / "backups" / "app-x.tar.gz.partial").write_text("the backup being written")
    (volume / "app.db").write_text("x")
    here = os.stat(volume / "backups")
    members, stats = archive(bba.ArchiveItem("/srv", str(volume), "/srv"), bba.ArchiveRules(backup_dir=(here.st_dev, here.st_ino)))
    assert sorted(members) == ["srv", "srv/app.db"]
    assert stats.warnings == ["the backup directory itself is inside this mount and was left out: /srv/backups"]
    assert bba.backup_dir_in_mounts(volume / "backups", [bba.MountPlan("/srv", "bind", str(volume), None, "docker")]) == ("/srv/backups",)


def test_archive_sockets_are_reported_not_dropped_in_silence(tmp_path):
    import socket
    volume = tmp_path / "volume"
    volume.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(volume / "app.sock"))
        members, stats = archive(bba.ArchiveItem("/run/app", str(volume), "/run/app"))
    assert "run/app/app.sock" not in members and stats.warnings == ["socket ignored: /run/app/app.sock"]


def test_archive_warnings_name_the_first_of_each_kind_and_count_the_rest(tmp_path, monkeypatch):
    """A session store whose clean-up runs during the walk: 70 files vanish, and 120 sockets sit beside them."""
    import socket
    volume = tmp_path / "v"
    volume.mkdir()
    for n in range(120):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(volume / f"s{n:03d}"))
    for n in range(70):
        (volume / f"gone-{n:02d}").write_text("x")
    (volume / "kept").write_text("kept")
    real_open = os.open

    def vanishing(path, flags, mode=0o777, *, dir_fd=None):
        if isinstance(path, str) and path.startswith("gone-"):
            raise FileNotFoundError(2, "No such file or directory", path)  # removed between the listing and the open
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(bba.os, "open", vanishing)
    members, stats = archive(bba.ArchiveItem("/data", str(volume), "/data"))
    assert sorted(members) == ["data", "data/kept"] and stats.sockets == 120
    assert stats.warnings == [*(f"vanished while archiving: /data/gone-{n:02d}" for n in range(bba.WARNINGS_PER_KIND)),
                              "vanished while archiving: 20 more, not listed",
                              *(f"socket ignored: /data/s{n:03d}" for n in range(bba.WARNINGS_PER_KIND)),
                              "socket ignored: 70 more, not listed"]


def test_plan_mounts_lists_tmpfs_mounts_that_docker_inspect_keeps_apart():
    container = fake_container("c", [{"Type": "volume", "Name": "v", "Source": "/x", "Destination": "/data", "RW": True}])
    container["HostConfig"] = {"Tmpfs": {"/run/cache": "", "/data/scratch": "size=1m"}}
    _, skipped = bba.plan_mounts(container, read_on_host=False)
    assert ("/run/cache", "tmpfs mount") in skipped and ("/data/scratch", "tmpfs mount") in skipped


# ---------------------------------------------------------------- PostgreSQL decisions


def test_dumpable_databases_fails_naming_one_that_refuses_connections_and_warns_of_invalid_ones():
    server = {"databases": [
        {"name": "postgres", "connect": True}, {"name": "template0", "connect": False, "template": True},
        {"name": "template1", "connect": True, "template": True}, {"name": "half-dropped", "connect": False, "invalid": True},
    ]}
    assert bba.dumpable_databases(server) == (["postgres", "template1"], ["half-dropped"])
    server["databases"].append({"name": "archive", "connect": False})
    with pytest.raises(bba.BackupError, match=r"database\(s\) 'archive' do not accept connections"):
        bba.dumpable_databases(server)


def test_check_databases_missing_from_the_dump_fail_extra_ones_warn():
    with pytest.raises(bba.BackupError, match="database\\(s\\) 'shop' listed by pg_database are not in the dump"):
        bba.check_databases(["postgres", "shop"], {"postgres": {}})
    assert bba.check_databases(["postgres"], {"postgres": {}, "new": {}}) == ["database 'new' is in the dump but was not listed before it (created meanwhile)"]


@pytest.mark.parametrize(("line", "name"), [
    ("postgres", "postgres"),
    ('"Caps"', "Caps"),
    ('"we""ird"', 'we"ird'),
    ("""-reuse-previous=on "dbname='we=ird db'\"""", "we=ird db"),
    ("-reuse-previous=on \"dbname='Odd\\'Name\\\\\\\\x'\"", "Odd'Name\\\\x"),  # as pg_dumpall 15 wrote it for Odd'Name\\x
])
def test_connect_target_reads_every_form_pg_dump_writes(line, name):
    assert bba.connect_target(line) == name


def test_pg_conninfo_quotes_names_psql_would_parse():
    assert bba.pg_conninfo("host=evil") == "dbname='host=evil'"
    assert bba.pg_conninfo("it's\\") == "dbname='it\\'s\\\\'"


def test_dump_census_counts_rows_and_large_objects_only_under_their_toc_entries():
    script = (
        b"\\connect postgres\n"
        b"--\n-- Name: f; Type: FUNCTION; Schema: public; Owner: x\n--\n\n"
        b"CREATE FUNCTION f() RETURNS void AS $$\nCOPY public.t (a) FROM stdin;\n$$ LANGUAGE sql;\n"  # not data
        b"--\n-- Name: 16400; Type: BLOB; Schema: -; Owner: x\n--\n\nSELECT pg_catalog.lo_create('16400');\n"
        b"--\n-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: x\n--\n\n"
        b"COPY public.t (a) FROM stdin;\n1\n\\\\.\n2\n\\.\n\n"  # the second row is a backslash and a dot, not the end marker
    )
    census = bba.DumpCensus()
    for i in range(0, len(script), 7):
        census.feed(script[i:i + 7])
    assert census.counts() == {"postgres": {"tables": 1, "rows": 3, "large_objects": 1, "row_counts": {"public.t": 3}}}
    cut = bba.DumpCensus()
    cut.feed(script[:-6])
    with pytest.raises(bba.BackupError, match="the dump ends inside the COPY block of public.t"):
        cut.counts()


# Fields as pg_dump writes them in COPY text: NULL, an escaped backslash (also before a dot,
# which is not the end marker), escaped control characters, plain text.
_COPY_FIELDS = st.sampled_from(["\\N", "\\\\", "\\\\.", "a\\tb", "x\\ny", ".", "plain", ""])


@settings(max_examples=examples(100))
@given(tables=st.lists(st.lists(st.lists(_COPY_FIELDS, min_size=1, max_size=6), max_size=120), min_size=1, max_size=3),
       cut=st.sampled_from([1, 3, 7, 64, 500, 4096, 1 << 20]))
def test_dump_census_finds_the_end_of_every_copy_block_whatever_its_escapes(tables, cut):
    # Many backslashes in one chunk take the find() fallback of _block_end, few the memchr path.
    script = b"\\connect shop\n"
    for n, rows in enumerate(tables):
        script += f"--\n-- Data for Name: t{n}; Type: TABLE DATA; Schema: public; Owner: x\n--\n\nCOPY public.t{n} (a) FROM stdin;\n".encode()
        script += b"".join("\t".join(fields).encode() + b"\n" for fields in rows) + b"\\.\n\n"
    census = bba.DumpCensus()
    for i in range(0, len(script), cut):
        census.feed(script[i:i + cut])
    row_counts = {f"public.t{n}": len(rows) for n, rows in enumerate(tables)}
    assert census.counts() == {"shop": {"tables": len(tables), "rows": sum(row_counts.values()), "large_objects": 0,
                                        "row_counts": dict(sorted(row_counts.items()))}}


@pytest.mark.parametrize("escapes", [0, 1, 31, 32, 33, 63, 64, 65, 200])
def test_dump_census_block_end_is_found_as_find_finds_it_before_and_after_its_fallback(escapes):
    # The 64th and 65th backslash are where _block_end leaves memchr for find().
    for window in (b"\n" + b"\\N\n" * escapes + b"\\.\n", b"\n" + b"a\\\\\n" * escapes + b"\\.\nrest", b"\\N\n" * escapes):
        assert bba.DumpCensus._block_end(window) == window.find(bba.DumpCensus.END_OF_COPY)


# ---------------------------------------------------------------- cleanup journal, drill env-file


def test_cleanup_journal_entries_are_struck_off_and_replayed_by_the_next_run(tmp_path, fake_docker, capsys):
    fake = fake_docker(fake_container("app", paused=True))
    backup_dir = tmp_path / "b"
    backup_dir.mkdir(mode=0o700)
    fd = os.open(backup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        journal = bba.CleanupJournal(fd, "app")
        noted = journal.add(kind="container-path", container="app", path="/tmp/x")
        assert json.loads((backup_dir / ".app.cleanup").read_text()) == [{"kind": "container-path", "container": "app", "path": "/tmp/x"}]
        assert stat.S_IMODE((backup_dir / ".app.cleanup").stat().st_mode) == 0o600
        journal.done(noted)
        assert not (backup_dir / ".app.cleanup").exists()
        journal.add(kind="paused", container="app")
        bba.CleanupJournal(fd, "app").replay(bba.Settings())
    finally:
        os.close(fd)
    assert fake.subcommands()[-1] == "unpause" and not (backup_dir / ".app.cleanup").exists()


def test_drill_env_file_is_private_and_never_holds_what_it_cannot_hold(tmp_path):
    box = bba.DrillContainer({"module": "m", "container": {}}, None, bba.Settings())
    path = box._env_file({"A": "1", "PASSWORD": "s3cret with spaces", "MULTI": "a\nb", "bad name": "x"})
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert Path(path).read_text() == "A=1\nPASSWORD=s3cret with spaces\n"
    finally:
        box._remove_env_file()
    assert not os.path.exists(path)


@settings(max_examples=examples(100))
@given(keys=st.lists(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**56 - 1, 2**56, 2**63, 2**64 - 1])), max_size=600))
def test_sorted_keys_is_sorted_and_finds_every_key_it_holds(keys):
    ordered = bba.sorted_keys(array.array("Q", keys))
    assert list(ordered) == sorted(keys)
    assert all(bba._sorted_has(ordered, key) for key in keys)
    assert not any(bba._sorted_has(ordered, key) for key in {0, 2**63 + 5, 2**64 - 1} - set(keys))


def test_sorted_keys_of_many_never_holds_them_as_a_list_of_ints():
    """300,000 keys (a bucket or a mount of 300,000 entries): sorted() allocates about 48 bytes a key; this, about 9."""
    import tracemalloc

    keys = array.array("Q", os.urandom(8 * 300_000))
    tracemalloc.start()
    try:
        ordered = bba.sorted_keys(keys)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        as_list = sorted(keys)
        list_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(ordered) == as_list
    assert peak < 16 * len(keys) < list_peak / 2  # the test can tell the two apart


def test_files_under_lists_what_os_walk_lists_one_directory_at_a_time(tmp_path):
    root = tmp_path / "bucket"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-prefix").mkdir()
    for path in ("top.json", "a/x", "a/b/y", "a/b/c/deep object name with spaces", "a/b/c/caf\u00e9"):
        (root / path).write_text(path)
    walked = {os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root) for name in names}
    assert sorted(bba.files_under(root)) == sorted(walked) and len(walked) == 5
    assert list(bba.files_under(tmp_path / "a bucket whose every object failed")) == []  # no folder: nothing mirrored


def test_mark_sets_the_bit_of_every_place_a_key_holds():
    keys = bba.sorted_keys([5, 9, 9, 2**63, 1, 2**64 - 1])  # 9 twice: two names of one hash
    marks = bytearray((len(keys) + 7) // 8)
    for key in (9, 2**64 - 1, 7):  # 7 is not there: nothing to mark
        bba._mark(keys, marks, key)
    assert [bool(marks[i >> 3] >> (i & 7) & 1) for i in range(len(keys))] == [key in (9, 2**64 - 1) for key in keys]
