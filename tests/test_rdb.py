"""The RDB reader against a real redis-server on this host: every type and encoding it writes.

Class B counts keys from the RDB that was archived, not from the live server; that is only
as good as this reader, so it is compared here with the server that wrote the file (DBSIZE
per database, INFO keyspace's keys with a TTL) and with redis-check-rdb.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import backup_before_apply as bba
from conftest import in_ci

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
def redis(tmp_path: Path):
    if not os.path.exists(REDIS_SERVER):
        if in_ci():
            pytest.fail("CI=true and no redis-server on this host (.ci/deps installs it)")
        pytest.skip("no redis-server on this host")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([REDIS_SERVER, "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path), "--save", "",
                             "--appendonly", "no", "--enable-debug-command", "yes", "--maxmemory-policy", "allkeys-lfu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cli(*args: str, stdin: bytes | None = None) -> str:
        return subprocess.run(["redis-cli", "-s", str(sock), *args], input=stdin, capture_output=True, check=True).stdout.decode()

    deadline = time.monotonic() + 20
    while not sock.exists() or subprocess.run(["redis-cli", "-s", str(sock), "PING"], capture_output=True).stdout != b"PONG\n":
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    try:
        yield cli, tmp_path / "dump.rdb"
    finally:
        proc.kill()
        proc.wait()


FILL = """
SET s:int 12345
SET s:neg -7
SET s:int32 2147483647
SET s:big 9223372036854775807
SET s:raw "hello world"
SET "s:odd key with spaces" v
SET s:exp v EX 100000
SET s:pexp v PX 100000000
SET s:long aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
RPUSH l:small a b c 1 2 3
SADD set:intset 1 2 3 400000
SADD set:small a b c
ZADD z:small 1 a 2.5 b -3 c
HSET h:small f1 v1 f2 v2
XADD st * a 1 b 2
XADD st * a 3
XGROUP CREATE st g1 0
XGROUP CREATE st g2 $
XREADGROUP GROUP g1 c1 COUNT 1 STREAMS st >
XREADGROUP GROUP g1 c2 COUNT 1 STREAMS st >
SELECT 5
SET db5:a 1
HSET db5:h x y
SELECT 15
SET db15 x
EXPIRE db15 100000
"""
BIG = ("for i=1,700 do redis.call('RPUSH','l:big','element-'..i); redis.call('SADD','set:big','m'..i); "
       "redis.call('ZADD','z:big',i,'m'..i); redis.call('HSET','h:big','f'..i,string.rep('x',100)); "
       "redis.call('SADD','set:bigint', i*1000); redis.call('XADD','st:big','*','f',i) end; "
       "redis.call('SET','s:lzf',string.rep('abcdefgh',500)); redis.call('RPUSH','l:plain',string.rep('y',20000)); "
       "redis.call('ZADD','z:inf','inf','top','-inf','bottom'); return 1")


def read(path: Path, expired_by=()):
    data = path.read_bytes()
    return bba.read_rdb(bba._RdbReader(io.BytesIO(data).read, len(data)), expired_by)


def keyspace(cli) -> dict[str, dict[str, int]]:
    found = {}
    for db, value in bba.parse_info(cli("INFO", "keyspace")).items():
        fields = dict(part.split("=", 1) for part in value.split(","))
        found[db] = {"keys": int(fields["keys"]), "expires": int(fields["expires"])}
    return found


def test_read_rdb_counts_every_type_as_the_server_that_wrote_it(redis):
    cli, path = redis
    cli(stdin=FILL.encode())
    cli("EVAL", BIG, "0")
    cli("FUNCTION", "LOAD", "#!lua name=lib\nredis.register_function('f1', function() return 1 end)")
    encodings = {cli("OBJECT", "ENCODING", key).strip() for key in ("set:big", "z:big", "h:big", "set:bigint", "l:big", "set:intset", "z:small")}
    assert {"hashtable", "skiplist", "quicklist", "intset", "listpack"} <= encodings  # the big and the small encodings are both in the file
    assert cli("SAVE").strip() == "OK"
    info = read(path)
    expected = keyspace(cli)
    assert {db: found["keys"] for db, found in info["dbs"].items()} == {db: v["keys"] for db, v in expected.items()}
    assert {db: found["expires"] for db, found in info["dbs"].items()} == {db: v["expires"] for db, v in expected.items()}
    assert bba.rdb_counts(info) == {db: v["keys"] for db, v in expected.items()}
    assert info["aux"]["redis-ver"] == bba.parse_info(cli("INFO", "server"))["redis_version"]
    assert abs(int(info["aux"]["ctime"]) - time.time()) < 60 and info["functions"] == 1
    check = subprocess.run(["redis-check-rdb", str(path)], capture_output=True, text=True).stdout
    assert f"[info] {sum(v['keys'] for v in expected.values())} keys read" in check


def test_read_rdb_counts_expired_keys_by_the_times_given(redis):
    cli, path = redis
    cli("SET", "soon", "1", "PX", "1500")
    cli("SET", "later", "1", "EX", "100000")
    cli("SET", "never", "1")
    cli("SAVE")
    now = int(time.time() * 1000)
    info = read(path, (now, now + 5000, now + 10**9))
    assert info["dbs"]["db0"]["keys"] == 3 and info["dbs"]["db0"]["expires"] == 2
    assert info["dbs"]["db0"]["expired"] == [0, 1, 2]


def test_read_rdb_refuses_every_truncation_and_trailing_garbage(redis):
    cli, path = redis
    cli(stdin=FILL.encode())
    cli("SAVE")
    data = path.read_bytes()
    for end in range(0, len(data)):
        with pytest.raises(bba.RdbError):
            bba.read_rdb(bba._RdbReader(io.BytesIO(data[:end]).read, end))
    reader = bba._RdbReader(io.BytesIO(data + b"xx").read, len(data) + 2)
    bba.read_rdb(reader)
    assert reader.unread() == 2  # the archive scan refuses bytes after the end marker


def _len(n: int) -> bytes:
    return bytes([n]) if n < 64 else bytes([0x40 | (n >> 8), n & 0xFF])


def _str(text: bytes) -> bytes:
    return _len(len(text)) + text


def test_read_rdb_types_of_newer_redis_releases():
    """Types written by Redis 7.2-8.0 (set listpack, stream v3, hashes with field TTLs), from their rdb.c loaders."""
    body = b"REDIS0012" + b"\xfa" + _str(b"redis-ver") + _str(b"7.4.0") + b"\xfe\x00"
    body += bytes([20]) + _str(b"set-lp") + _str(b"<listpack bytes>")
    stream = _len(1) + _str(b"0" * 16) + _str(b"<lp>") + _len(2) + _len(5) + _len(0) + _len(1) + _len(0) + _len(0) + _len(0) + _len(2)
    stream += _len(1) + _str(b"group") + _len(5) + _len(0) + _len(1)  # one group: name, last id, entries read
    stream += _len(1) + b"\x00" * 16 + b"\x00" * 8 + _len(1)  # its pending entry: id, delivery time, count
    stream += _len(1) + _str(b"consumer") + b"\x00" * 8 + b"\x00" * 8 + _len(1) + b"\x00" * 16  # seen, active, one pending id
    body += bytes([21]) + _str(b"stream-v3") + stream
    body += bytes([24]) + _str(b"hash-ttl") + b"\x00" * 8 + _len(2) + _len(0) + _str(b"f1") + _str(b"v1") + _len(7) + _str(b"f2") + _str(b"v2")
    body += bytes([22]) + _str(b"hash-ttl-rc") + _len(1) + _len(0) + _str(b"f") + _str(b"v")
    body += bytes([25]) + _str(b"hash-lp-ttl") + b"\x00" * 8 + _str(b"<listpack>")
    body += bytes([23]) + _str(b"hash-lp-ttl-rc") + _str(b"<listpack>")
    body += b"\xff" + b"\x00" * 8
    info = bba.read_rdb(bba._RdbReader(io.BytesIO(body).read, len(body)))
    assert info["dbs"]["db0"]["keys"] == 6 and info["aux"]["redis-ver"] == "7.4.0"


def test_read_rdb_type_unknown_to_this_tool_is_named_and_keeps_the_header():
    body = b"REDIS0013" + b"\xfa" + _str(b"ctime") + _str(b"1700000000") + b"\xfe\x00" + bytes([26]) + _str(b"k") + b"..."
    found: dict = {}
    with pytest.raises(bba.RdbError, match="value type 26 is unknown to this tool"):
        bba.read_rdb(bba._RdbReader(io.BytesIO(body).read, len(body)), into=found)
    assert found["aux"]["ctime"] == "1700000000" and found["version"] == 13


def test_lzf_decompress_literals_and_overlapping_back_references():
    # "abc" as a literal run, then a back reference of 9 bytes at distance 3 (it overlaps what it writes).
    assert bba.lzf_decompress(b"\x02abc" + bytes([(7 << 5) | 0, 9 - 2 - 7, 2]), 12) == b"abcabcabcabc"
    with pytest.raises(bba.RdbError):
        bba.lzf_decompress(b"\x02abc\xe0\x05\x40", 12)
