"""End to end, classes A and B: real PostgreSQL and Redis in containers on the private engine.

Backup, --verify, --drill, secrets kept out of argv/logs/manifests, and the failures a
database backup must not survive silently.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TOOL, ArgvWatcher, run_tool, write_module
from conftest import run_backup as backup

PG_PASSWORD = "pg-Secret-4c1d"
REDIS_PASSWORD = "redis-Secret-9f2e"


def psql(engine, container: str, database: str, *sql: str, user: str = "appadmin") -> str:
    argv = ["exec", container, "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-U", user, "-d", database]
    for statement in sql:
        argv += ["-c", statement]
    return engine.docker(*argv).stdout


@pytest.fixture
def postgres(docker_engine, tmp_path):
    return honcho_postgres(docker_engine, tmp_path)


def honcho_postgres(engine, tmp_path: Path):
    """Module honcho-postgres: databases shop (4,321 orders, an empty table, a large object) and crm, a role."""
    platform = tmp_path / "platform"
    write_module(platform, "honcho-postgres")
    engine.run_postgres("apps-honcho-postgres-1", "--label", "com.docker.compose.service=honcho-postgres", user="appadmin", password=PG_PASSWORD)
    c = "apps-honcho-postgres-1"
    psql(engine, c, "postgres", "CREATE DATABASE shop", "CREATE DATABASE crm", "CREATE ROLE reporter LOGIN PASSWORD 'reporter-pw'")
    psql(engine, c, "shop",
         "CREATE TABLE orders (id int PRIMARY KEY, note text)",
         "INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 4321) g",
         "CREATE TABLE empty_one (x int)",
         "SELECT lo_from_bytea(0, 'a large object')",
         "GRANT SELECT ON orders TO reporter")
    psql(engine, c, "crm", "CREATE SCHEMA sales", "CREATE TABLE sales.leads AS SELECT g AS id FROM generate_series(1, 17) g")
    return engine, platform, c


def test_e2e_postgres_databases_are_listed_again_under_the_lock_only_if_another_run_held_it(postgres, tmp_path):
    """The size estimate's catalog read serves the dump's check when the lock was free; after waiting for it, it is read again."""
    import fcntl
    import threading

    engine, platform, _ = postgres
    backup_dir = tmp_path / "b"
    proc = backup(engine, platform, "honcho-postgres", backup_dir, "--debug")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("SELECT json_build_object(") == 1
    with open(backup_dir / ".honcho-postgres.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        threading.Timer(2, lambda: fcntl.flock(held, fcntl.LOCK_UN)).start()
        proc = backup(engine, platform, "honcho-postgres", backup_dir, "--debug", "--lock-timeout", "60")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("SELECT json_build_object(") == 2


def test_e2e_postgres_disk_full_mid_dump_names_the_filesystem_and_leaves_nothing(postgres, tmp_path):
    """pg_dumpall writes into pigz directly: when the disk fills, pigz is stopped, the dump dies of it, and the disk is what is reported."""
    from test_backup_unit import tiny_filesystem

    engine, platform, container = postgres
    psql(engine, container, "shop", "CREATE TABLE filler AS SELECT g, md5(g::text) || md5((g * 7)::text) AS pad FROM generate_series(1, 200000) g")
    with tiny_filesystem(tmp_path / "full", size="1m") as backup_dir:
        proc = backup(engine, platform, "honcho-postgres", backup_dir, "--no-space-check")
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].startswith(f"backup-before-apply: error: no space left on the filesystem of {backup_dir}")
        assert sorted(p.name for p in backup_dir.iterdir()) == [".honcho-postgres.lock"]
    assert "pg_dump" not in engine.docker("exec", container, "ps", "-eo", "args").stdout


def test_e2e_postgres_backup_verify_drill(postgres, tmp_path):
    engine, platform, container = postgres
    with ArgvWatcher(PG_PASSWORD) as watcher:
        proc = backup(engine, platform, "honcho-postgres", tmp_path / "b", "--debug")
    assert proc.returncode == 0, proc.stderr
    assert watcher.samples > 0 and watcher.hits == []
    dump, manifest_path = map(Path, proc.stdout.split())
    assert dump.name.endswith(".sql.gz") and oct(dump.stat().st_mode & 0o777) == "0o600"
    sql = gzip.decompress(dump.read_bytes())
    assert b"CREATE ROLE reporter;" in sql and b"CREATE DATABASE shop" in sql
    assert sql.rstrip().endswith(b"-- PostgreSQL database cluster dump complete\n--") or b"cluster dump complete" in sql[-200:]
    assert PG_PASSWORD not in proc.stderr and PG_PASSWORD not in manifest_path.read_text()
    doc = json.loads(manifest_path.read_text())
    assert doc["class"] == "A" and doc["procedure"] == "pg-dumpall" and doc["format"] == "sql.gz"
    assert doc["server"]["engine"] == "postgresql" and doc["server"]["version"].startswith("15")
    assert doc["counts"]["shop"]["row_counts"] == {"public.empty_one": 0, "public.orders": 4321}
    assert doc["counts"]["shop"]["large_objects"] == 1
    assert doc["counts"]["crm"] == {"tables": 1, "rows": 17, "large_objects": 0, "row_counts": {"sales.leads": 17}}
    assert doc["verification"]["trailer"] is True and doc["sha256"] == hashlib.sha256(dump.read_bytes()).hexdigest()

    verify = run_tool("--verify", str(dump), env=engine.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert [line.split()[:2] for line in verify.stdout.splitlines()] == [["ok", "size"], ["ok", "private"], ["ok", "sha256"], ["ok", "structure"], ["ok", "counts"]]

    with ArgvWatcher(PG_PASSWORD) as watcher:
        drill = run_tool("--drill", str(dump), env=engine.env)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert watcher.hits == []
    assert "  rows: 4321 = 4321" in drill.stdout and "  large_objects: 1 = 1" in drill.stdout
    assert "psql: 2 error(s) while loading, 2 known to be harmless" in drill.stdout
    assert drill.stdout.strip().endswith("drill passed: the restored data matches the manifest")
    names = engine.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert names == [container]  # the throwaway container is gone; the live one untouched
    assert not [v for v in engine.docker("volume", "ls", "-q").stdout.split() if v.startswith("bba-drill")]
    assert engine.inspect(container)["State"]["Running"] is True


def test_e2e_verify_detects_flipped_byte_and_truncation(postgres, tmp_path):
    engine, platform, _ = postgres
    proc = backup(engine, platform, "honcho-postgres", tmp_path / "b")
    dump = Path(proc.stdout.split()[0])
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    flipped = run_tool("--verify", str(dump), env=engine.env)
    assert flipped.returncode == 1
    assert re.search(r"^FAIL  sha256", flipped.stdout, re.M) and re.search(r"^FAIL  structure", flipped.stdout, re.M)
    assert flipped.stderr.strip().splitlines()[-1] == f"backup-before-apply: error: verification of {dump.name} failed: sha256, structure"
    dump.write_bytes(bytes(data[: len(data) // 3]))
    truncated = run_tool("--verify", str(dump), env=engine.env)
    assert truncated.returncode == 1
    assert re.search(r"^FAIL  size", truncated.stdout, re.M) and "not a complete gzip stream" in truncated.stdout
    drill = run_tool("--drill", str(dump), env=engine.env)
    assert drill.returncode == 1 and "fails --verify" in drill.stderr


def test_e2e_drill_of_broken_dump_fails_clearly(postgres, tmp_path):
    engine, platform, _ = postgres
    proc = backup(engine, platform, "honcho-postgres", tmp_path / "b")
    dump, manifest_path = map(Path, proc.stdout.split())
    sql = gzip.decompress(dump.read_bytes()).replace(b"CREATE TABLE public.orders", b"CREATE TABLEX public.orders", 1)
    dump.write_bytes(gzip.compress(sql))
    doc = json.loads(manifest_path.read_text())
    doc.update(bytes=dump.stat().st_size, sha256=hashlib.sha256(dump.read_bytes()).hexdigest())
    doc["verification"]["sql_bytes"] = len(sql)
    manifest_path.write_text(json.dumps(doc))  # so that it passes --verify and reaches the restore
    drill = run_tool("--drill", str(dump), env=engine.env)
    assert drill.returncode == 1
    last = drill.stderr.strip().splitlines()[-1]
    assert last.startswith("backup-before-apply: error: drill failed: psql reported") and 'syntax error at or near "TABLEX"' in last
    assert not [n for n in engine.docker("ps", "-a", "--format", "{{.Names}}").stdout.split() if n.startswith("bba-drill")]


def test_e2e_postgres_killed_mid_dump_exit_1_no_file(postgres, tmp_path):
    engine, platform, container = postgres
    psql(engine, container, "shop", "CREATE TABLE big AS SELECT g, md5(g::text) || md5((g * 7)::text) AS pad FROM generate_series(1, 1500000) g")
    backup_dir = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), "honcho-postgres", "--platform-root", str(platform), "--backup-dir", str(backup_dir),
         "--compress-level", "9", "--allow-ci"],
        env=engine.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "dumping with pg_dumpall" in line:
            break
    time.sleep(0.3)
    engine.docker("kill", container)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert out == ""
    assert err.strip().splitlines()[-1].startswith("backup-before-apply: error: ")
    assert sorted(p.name for p in backup_dir.iterdir()) == [".honcho-postgres.lock"]


@pytest.fixture(params=[False, True], ids=["aof-off", "aof-on"])
def redis(request, docker_engine, tmp_path):
    return infisical_redis(docker_engine, tmp_path, request.param)


def infisical_redis(engine, tmp_path: Path, aof: bool, extra: str = ""):
    """Module infisical-redis (container cache): 1,500 strings in db0 and 25 hashes in db3, AOF on or off."""
    platform = tmp_path / "platform"
    write_module(platform, "infisical-redis", container="cache")
    engine.run_redis("cache", password=REDIS_PASSWORD, appendonly=aof, extra=extra)
    script = "".join(f"SET key:{i} value-{i}\n" for i in range(1500)) + "SELECT 3\n" + "".join(f"HSET h:{i} f v\n" for i in range(25))
    engine.docker("exec", "-i", "-e", "REDISCLI_AUTH", "cache", "redis-cli", input=script.encode(), env_extra={"REDISCLI_AUTH": REDIS_PASSWORD})
    return engine, platform, aof


def test_e2e_redis_backup_verify_drill(redis, tmp_path):
    engine, platform, aof = redis
    with ArgvWatcher(REDIS_PASSWORD) as watcher:
        proc = backup(engine, platform, "infisical-redis", tmp_path / "b", "--debug")
    assert proc.returncode == 0, proc.stderr
    assert watcher.samples > 0 and watcher.hits == []
    assert REDIS_PASSWORD not in proc.stderr
    archive, manifest_path = map(Path, proc.stdout.split())
    assert REDIS_PASSWORD not in manifest_path.read_text()
    doc = json.loads(manifest_path.read_text())
    assert doc["procedure"] == "redis-bgsave" and doc["fallback_used"] is None
    assert doc["counts"] == {"db0": 1500, "db3": 25}
    assert doc["verification"]["rdb_magic"] is True and doc["verification"]["redis_check_rdb"] == "ok"
    assert doc["contents"]["appendonly"] is aof and doc["contents"]["bgsave"]["lastsave_after"] > doc["contents"]["bgsave"]["lastsave_before"]
    expected_paths = ["/data/dump.rdb"] + (["/data/appendonlydir"] if aof else [])
    assert doc["archived_paths"] == expected_paths

    assert run_tool("--verify", str(archive), env=engine.env).returncode == 0
    with ArgvWatcher(REDIS_PASSWORD) as watcher:
        drill = run_tool("--drill", str(archive), env=engine.env)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert watcher.hits == []
    assert "pass 1: Redis loaded /data/dump.rdb (the RDB of record)" in drill.stdout
    assert drill.stdout.count("  db0 keys: 1500 = 1500") == (2 if aof else 1) and "  db3 keys: 25 = 25" in drill.stdout
    assert ("pass 2: Redis loaded the archived AOF (/data/appendonlydir)" in drill.stdout) is aof


def test_e2e_redis_bgsave_renamed_falls_back_to_the_rdb_on_disk_with_its_own_counts(docker_engine, tmp_path):
    """The fallback archive holds the last RDB on disk: its keys are recorded, not the live server's, and its age is said."""
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "redis")
    engine.run_redis("redis", extra='rename-command BGSAVE ""')
    engine.docker("exec", "-i", "redis", "redis-cli", input="".join(f"SET old:{i} x\n" for i in range(300)).encode())
    engine.docker("exec", "redis", "redis-cli", "SAVE")
    engine.docker("exec", "-i", "redis", "redis-cli", input="".join(f"SET new:{i} x\n" for i in range(200)).encode())  # only in memory
    proc = backup(engine, platform, "redis", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert "BGSAVE NOT POSSIBLE" in proc.stderr and "FALLING BACK" in proc.stderr
    assert re.search(r"FALLBACK: the archive holds /data/dump.rdb written at .* ago, file modified .*\); LASTSAVE .*: "
                     r"writes made since then are NOT in this backup", proc.stderr)
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert doc["procedure"] == "redis-bgsave" and doc["configured_procedure"] == "redis-bgsave"
    assert doc["fallback_used"]["procedure"] == "mounted-archive" and "unknown command" in doc["fallback_used"]["reason"]
    assert doc["counts"] == {"db0": 300}  # what the archive holds; the live server has 500
    assert doc["contents"]["rdb"] == "/data/dump.rdb" and doc["contents"]["lastsave"] > 0
    assert abs(doc["contents"]["rdb_file"]["mtime"] - doc["contents"]["rdb_file"]["ctime"]) <= 2
    assert doc["warnings"][0].startswith("fallback to mounted-archive")
    assert run_tool("--verify", proc.stdout.split()[0], env=engine.env).returncode == 0
    drill = run_tool("--drill", proc.stdout.split()[0], env=engine.env)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "  db0 keys: 300 = 300" in drill.stdout


def test_e2e_redis_fallback_without_any_rdb_or_aof_is_no_backup(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "redis")
    engine.run_redis("redis", extra='rename-command BGSAVE ""')
    engine.docker("exec", "redis", "redis-cli", "SET", "a", "1")
    proc = backup(engine, platform, "redis", tmp_path / "b")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("backup-before-apply: error: the mounts of redis hold no dump.rdb and no AOF: "
                                                    "this archive would not restore Redis; no backup written")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".redis.lock"]


def test_e2e_class_e_drill_compares_restored_tree(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "uptime-kuma")
    engine.run_container("uptime-kuma", "-v", "kuma:/app/data")
    engine.docker("exec", "uptime-kuma", "sh", "-c", "mkdir /app/data/d && echo x > /app/data/d/f && ln /app/data/d/f /app/data/h && chown 7:8 /app/data/d")
    for via in ([], ["--via-docker"]):
        proc = backup(engine, platform, "uptime-kuma", tmp_path / "b", *via)
        assert proc.returncode == 0, proc.stderr
        drill = run_tool("--drill", proc.stdout.split()[0], env=engine.env)
        assert drill.returncode == 0, drill.stdout + drill.stderr
        assert "  members: 4 = 4" in drill.stdout and "listing_sha256" in drill.stdout


def test_e2e_redis_restore_notes_followed_literally(redis, tmp_path):
    """Class B's restore notes in classes.toml, step by step, on the live container."""
    engine, platform, aof = redis
    proc = backup(engine, platform, "infisical-redis", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    archive = proc.stdout.split()[0]
    auth = {"REDISCLI_AUTH": REDIS_PASSWORD}
    engine.docker("exec", "-e", "REDISCLI_AUTH", "cache", "redis-cli", "SET", "after-backup", "1", env_extra=auth)
    engine.docker("stop", "cache")
    if aof:
        engine.docker("run", "--rm", "--network", "none", "--volumes-from", "cache", "bba-base:latest", "rm", "-rf", "/data/appendonlydir")
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert f"gunzip -c {archive} | docker run --rm -i --cap-add SYS_ADMIN --volumes-from cache \\\n" in doc["restore"]
    notes_tar = "tar --xattrs --xattrs-include='*' --acls --numeric-owner -xpf - -C /"
    assert notes_tar in doc["restore"]
    unpacked = subprocess.run(["gunzip", "-c", archive], capture_output=True, check=True).stdout
    engine.docker("run", "--rm", "-i", "--cap-add", "SYS_ADMIN", "--network", "none", "-v", "/usr:/usr:ro", "--volumes-from", "cache",
                  "bba-base:latest", *shlex.split(notes_tar), input=unpacked)
    engine.docker("start", "cache")
    engine.wait_for("cache", ["sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli info persistence | grep -q "^loading:0"'])
    keyspace = engine.docker("exec", "-e", "REDISCLI_AUTH", "cache", "redis-cli", "INFO", "keyspace", env_extra=auth).stdout
    assert "db0:keys=1500," in keyspace and "db3:keys=25," in keyspace
    assert engine.docker("exec", "-e", "REDISCLI_AUTH", "cache", "redis-cli", "EXISTS", "after-backup", env_extra=auth).stdout.strip() == "0"


@pytest.mark.parametrize("compression", ["zstd", "gzip-zlib"])
def test_e2e_postgres_other_compressions_verify_and_drill(postgres, tmp_path, compression):
    engine, platform, _ = postgres
    args = ["--compression", "zstd"] if compression == "zstd" else ["--compression", "gzip"]
    env = {**engine.env, "BBA_GZIP_TOOL": "zlib"} if compression == "gzip-zlib" else engine.env
    proc = run_tool("honcho-postgres", "--platform-root", str(platform), "--backup-dir", str(tmp_path / "b"), *args, env=env)
    assert proc.returncode == 0, proc.stderr
    dump = proc.stdout.split()[0]
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert dump.endswith(".sql.zst" if compression == "zstd" else ".sql.gz")
    assert doc["compression"]["tool"] == ("zstd" if compression == "zstd" else "zlib")
    assert run_tool("--verify", dump, env=engine.env).returncode == 0
    drill = run_tool("--drill", dump, env=engine.env)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "  rows: 4321 = 4321" in drill.stdout
