"""--restore on a real engine: a bad apply undone, the undo undone, and every refusal touching nothing.

What comes back is compared with what was there before by test_fidelity's lstat walk
(owners, modes, mtimes, contents, xattrs, allocated blocks), not by the tool's own digest.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import backup_before_apply as bba
import pytest
from conftest import TOOL, run_backup, run_tool
from test_e2e_databases import REDIS_PASSWORD, honcho_postgres, infisical_redis, psql
from test_e2e_engines import MINIO_SECRET, VAULT_TOKEN, agaria_module, meili_module, minio_module, vault_module
from test_e2e_fidelity import keeper_module, mountpoint
from test_fidelity import walk

MODULE = "keeper"


@pytest.fixture
def keeper(docker_engine, tmp_path):
    return keeper_module(docker_engine, tmp_path, deep=False)


@pytest.fixture
def minio(docker_engine, tmp_path):
    return minio_module(docker_engine, tmp_path)


@pytest.fixture
def meili(docker_engine, tmp_path):
    return meili_module(docker_engine, tmp_path)


@pytest.fixture
def agaria(docker_engine, tmp_path):
    return agaria_module(docker_engine, tmp_path)


def restore(engine, platform: Path, path: str, *args: str):
    return run_tool("--restore", path, "--platform-root", str(platform), *args, env=engine.env, timeout=600)


def without_socket(tree: dict) -> dict:
    return {name: entry for name, entry in tree.items() if entry[0] != stat.S_IFSOCK}


def bad_apply(volume: Path) -> None:
    (volume / "dense").unlink()
    (volume / "d" / "f").write_bytes(b"changed by the apply\n")
    (volume / "new-after-the-backup").write_text("x")
    os.chmod(volume / "old", 0o600)
    shutil.rmtree(volume / "d")


def started_at(engine) -> str:
    return engine.inspect(MODULE)["State"]["StartedAt"]


def backed_up(keeper, tmp_path: Path) -> tuple:
    """Back the keeper module up; return the engine, the platform, the volume, the archive and the volume's entries (no socket)."""
    engine, platform = keeper
    volume = mountpoint(engine, "keeper-data")
    proc = run_backup(engine, platform, MODULE, tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    return engine, platform, volume, proc.stdout.split()[0], without_socket(walk(volume))


def test_e2e_restore_undoes_a_bad_apply_and_the_safety_backup_undoes_the_restore(keeper, tmp_path):
    engine, platform, volume, archive, before = backed_up(keeper, tmp_path)
    bad_apply(volume)
    broken = walk(volume)

    done = restore(engine, platform, archive, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored and compared: equal" in done.stdout and "container keeper stopped" in done.stdout
    assert without_socket(walk(volume)) == before  # the file the apply added is gone; the ones it removed are back
    assert engine.inspect(MODULE)["State"]["Running"] is True
    safety = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("safety backup of the state before"))
    doc = json.loads(Path(safety.replace(".tar.gz", ".manifest.json")).read_text())
    assert doc["taken_before_restore"] == {"restoring": archive}
    assert "to undo this restore: python3 " in done.stdout and f"--restore {safety}" in done.stdout

    undo = restore(engine, platform, safety, "--yes", "--no-safety-backup")
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert "NO safety backup (--no-safety-backup)" in undo.stdout
    assert without_socket(walk(volume)) == without_socket(broken)


def add_a_deep_tree(volume: Path, depth: int) -> None:
    """What an apply may leave: a directory nested depth levels (a file every 500), by directory descriptors."""
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("added-by-the-apply", dir_fd=fd)
    for level in range(depth):
        child = os.open("added-by-the-apply" if level == 0 else "d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
        os.mkdir("d", dir_fd=fd)
        if level % 500 == 0:
            leaf = os.open(f"file-{level}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
            os.write(leaf, b"%d\n" % level)
            os.close(leaf)
    os.close(fd)


def test_e2e_restore_removes_what_the_apply_added_however_deep(keeper, tmp_path):
    """A tree of 3,000 levels added after the backup: the safety backup takes it, the restore removes it.

    shutil.rmtree recurses, and stopped with RecursionError at about 1,000 levels on Python
    3.11, the mount half emptied.
    """
    engine, platform, volume, archive, before = backed_up(keeper, tmp_path)
    add_a_deep_tree(volume, 3000)

    done = restore(engine, platform, archive, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored and compared: equal" in done.stdout
    assert without_socket(walk(volume)) == before
    safety = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("safety backup of the state before"))
    with open(safety, "rb") as fh:
        deepest = max(bba.scan_tar(fh, "tar.gz", keep=lambda name: "/file-2500" in name)["files"])
    assert deepest.startswith("data/added-by-the-apply/" + "d/" * 2500) and deepest.endswith("/file-2500")


def test_e2e_restore_refusals_touch_nothing(keeper, tmp_path):
    engine, platform = keeper
    volume = mountpoint(engine, "keeper-data")
    proc = run_backup(engine, platform, MODULE, tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    archive, manifest = proc.stdout.split()
    bad_apply(volume)
    broken, started = walk(volume), started_at(engine)

    unconfirmed = restore(engine, platform, archive)  # no terminal, no --yes
    assert unconfirmed.returncode == 3
    assert unconfirmed.stderr.strip().splitlines()[-1].endswith("confirm it by typing the module id on a terminal, or pass --yes")

    dry = restore(engine, platform, archive, "--dry-run")
    assert dry.returncode == 0 and "would docker stop keeper" in dry.stdout and "would empty /data" in dry.stdout

    tampered = tmp_path / "tampered"
    tampered.mkdir(mode=0o700)
    copy = tampered / Path(archive).name
    data = bytearray(Path(archive).read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    copy.chmod(0o600)
    shutil.copy(manifest, tampered / Path(manifest).name)
    bad = restore(engine, platform, str(copy), "--yes")
    assert bad.returncode == 1 and "fails --verify" in bad.stderr and "the container was not touched" in bad.stderr
    assert sorted(p.name for p in tampered.iterdir() if not p.name.startswith(".")) == sorted([copy.name, Path(manifest).name])  # no safety backup

    other = json.loads(Path(manifest).read_text())
    other["procedure"] = "compose-root-archive"  # class G: never restored by the tool, its follow-up steps printed
    (tampered / Path(manifest).name).write_text(json.dumps(other))
    unsupported = restore(engine, platform, str(tampered / Path(manifest).name), "--yes")
    assert unsupported.returncode == 2 and "Agaria-specific follow-up required" in unsupported.stderr

    ci = run_tool_under_ci(engine, platform, archive)
    assert ci.returncode == 3

    assert walk(volume) == broken and started_at(engine) == started  # never stopped, nothing written


def run_tool_under_ci(engine, platform: Path, archive: str):
    """As run_tool, without --allow-ci: CI=true must refuse a restore."""
    return subprocess.run([sys.executable, str(TOOL), "--restore", archive, "--yes", "--platform-root", str(platform)],
                          env={**engine.env, "CI": "true"}, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- class A


def pg_state(engine, container: str) -> dict[str, str]:
    """What the server holds, asked in SQL (not the tool's census): tables with their rows, per database."""
    found = {}
    for database in ("shop", "crm"):
        tables = psql(engine, container, database, "SELECT string_agg(n.nspname || '.' || c.relname, ' ' ORDER BY 1) FROM pg_class c "
                      "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')")
        for table in tables.split():
            found[f"{database}:{table}"] = psql(engine, container, database, f"SELECT count(*) FROM {table}").strip()
    found["large objects"] = psql(engine, container, "shop", "SELECT count(*) FROM pg_largeobject_metadata").strip()
    return found


@pytest.fixture
def postgres(docker_engine, tmp_path):
    return honcho_postgres(docker_engine, tmp_path)


def test_e2e_restore_class_a_after_a_bad_apply_then_undo(postgres, tmp_path):
    engine, platform, container = postgres
    proc = run_backup(engine, platform, "honcho-postgres", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    dump = proc.stdout.split()[0]
    before = pg_state(engine, container)
    psql(engine, container, "shop", "DROP TABLE empty_one", "DELETE FROM orders WHERE id > 4000", "CREATE TABLE after_the_backup (x int)",
         "INSERT INTO after_the_backup VALUES (1)")
    broken = pg_state(engine, container)
    assert broken != before and "shop:public.after_the_backup" in broken

    holder = subprocess.Popen(["docker", "exec", container, "psql", "-U", "appadmin", "-d", "shop", "-c", "SELECT pg_sleep(120)"],
                              env=engine.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # the session is open
        refused = run_tool("--restore", dump, "--yes", "--platform-root", str(platform), env=engine.env, timeout=300)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "other session(s) on the databases the dump replaces" in refused.stderr and "--terminate-connections" in refused.stderr
        assert pg_state(engine, container) == broken

        done = run_tool("--restore", dump, "--yes", "--terminate-connections", "--platform-root", str(platform), env=engine.env, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        holder.kill()
    assert "ended 1 other session(s)" in done.stdout and "restored and compared: equal" in done.stdout
    assert pg_state(engine, container) == before  # the table made after the backup is gone, the dropped one back
    safety = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("safety backup of the state before"))
    undo = run_tool("--restore", safety, "--yes", "--no-safety-backup", "--platform-root", str(platform), env=engine.env, timeout=600)
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert pg_state(engine, container) == broken
    assert psql(engine, container, "postgres", "SELECT string_agg(datname, ',' ORDER BY 1) FROM pg_database WHERE NOT datallowconn").strip() == "template0"


def test_e2e_restore_refuses_a_dump_from_a_newer_server(postgres, tmp_path):
    engine, platform, container = postgres
    proc = run_backup(engine, platform, "honcho-postgres", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    dump, manifest = proc.stdout.split()
    doc = json.loads(Path(manifest).read_text())
    live = doc["server"]["version"]
    doc["server"]["version"] = f"{int(live.split('.')[0]) + 1}.0"  # as if dumped by the next major release
    Path(manifest).write_text(json.dumps(doc))
    refused = run_tool("--restore", dump, "--yes", "--platform-root", str(platform), env=engine.env, timeout=300)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert f"the dump is from PostgreSQL {doc['server']['version']}, the live server is {live}" in refused.stderr
    before = pg_state(engine, container)
    refused = run_tool("--restore", dump, "--yes", "--via-docker", "--platform-root", str(platform), env=engine.env, timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"backup-before-apply: error: --restore --via-docker applies to archived mounts only (mounted-archive, search-engine); "
        f"{Path(dump).name} is a pg-dumpall backup, put back its own way; nothing was touched")
    assert pg_state(engine, container) == before


# ---------------------------------------------------------------- class B


def redis_digest(engine) -> tuple[str, str]:
    """DEBUG DIGEST (the whole dataset's digest, from Redis itself) and the keyspace line."""
    auth = {"REDISCLI_AUTH": REDIS_PASSWORD}
    digest = engine.docker("exec", "-e", "REDISCLI_AUTH", "cache", "redis-cli", "DEBUG", "DIGEST", env_extra=auth).stdout.strip()
    keyspace = engine.docker("exec", "-e", "REDISCLI_AUTH", "cache", "redis-cli", "INFO", "keyspace", env_extra=auth).stdout
    return digest, " ".join(line.split(",")[0] for line in keyspace.splitlines() if line.startswith("db"))


@pytest.mark.parametrize("aof", [False, True], ids=["aof-off", "aof-on"])
def test_e2e_restore_class_b_after_a_bad_apply_then_undo(docker_engine, tmp_path, aof):
    engine, platform, _ = infisical_redis(docker_engine, tmp_path, aof, extra="enable-debug-command yes")
    proc = run_backup(engine, platform, "infisical-redis", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    archive = proc.stdout.split()[0]
    before = redis_digest(engine)
    script = "FLUSHALL\nSET after-the-backup 1\nSELECT 5\nSET elsewhere 2\n"
    engine.docker("exec", "-i", "-e", "REDISCLI_AUTH", "cache", "redis-cli", input=script.encode(), env_extra={"REDISCLI_AUTH": REDIS_PASSWORD})
    broken = redis_digest(engine)
    assert broken != before

    done = run_tool("--restore", archive, "--yes", "--platform-root", str(platform), env=engine.env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored and compared: equal" in done.stdout
    if aof:
        assert "replaced by a manifest naming a copy of that RDB as its base" in done.stdout
    assert redis_digest(engine) == before == (before[0], "db0:keys=1500 db3:keys=25")
    safety = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("safety backup of the state before"))
    undo = run_tool("--restore", safety, "--yes", "--no-safety-backup", "--platform-root", str(platform), env=engine.env, timeout=600)
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert redis_digest(engine) == broken


@pytest.mark.parametrize(("backup_aof", "live_aof"), [(False, True), (True, False)], ids=["backup-aof-off-live-on", "backup-aof-on-live-off"])
def test_e2e_restore_class_b_when_the_apply_switched_appendonly(docker_engine, tmp_path, backup_aof, live_aof):
    """The origin's pitfall: whatever appendonly says now, the backup's data comes back, not an empty or stale dataset."""
    engine, platform, _ = infisical_redis(docker_engine, tmp_path, backup_aof, extra="enable-debug-command yes")
    proc = run_backup(engine, platform, "infisical-redis", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    before = redis_digest(engine)
    engine.docker("rm", "-f", "cache")  # the apply: the same volume, appendonly switched
    engine.run_redis("cache", password=REDIS_PASSWORD, appendonly=live_aof, extra="enable-debug-command yes", volume="cache-data")
    # appendonly switched on starts from an empty AOF, ignoring dump.rdb: the very loss a rollback is for
    engine.docker("exec", "-i", "-e", "REDISCLI_AUTH", "cache", "redis-cli", input=b"FLUSHALL\nSET after-the-apply 1\n",
                  env_extra={"REDISCLI_AUTH": REDIS_PASSWORD})

    done = run_tool("--restore", proc.stdout.split()[0], "--yes", "--platform-root", str(platform), env=engine.env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored and compared: equal" in done.stdout
    assert redis_digest(engine) == before
    config = engine.docker("exec", "-e", "REDISCLI_AUTH", "cache", "redis-cli", "CONFIG", "GET", "appendonly",
                           env_extra={"REDISCLI_AUTH": REDIS_PASSWORD}).stdout.split()
    assert config == ["appendonly", "yes" if live_aof else "no"]  # the live configuration is left as the apply made it


# ---------------------------------------------------------------- interrupted


def interrupted_restore(engine, platform: Path, path: str, when: str, delay: float) -> tuple[int, str]:
    """Run a restore and send it SIGINT delay seconds after it logs a line holding when; return its exit status and stderr."""
    child = subprocess.Popen([sys.executable, str(TOOL), "--restore", path, "--yes", "--platform-root", str(platform), "--allow-ci"],
                             env=engine.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    seen = []
    for line in child.stderr:
        seen.append(line)
        if when in line:
            time.sleep(delay)
            child.send_signal(signal.SIGINT)
            break
    _, rest = child.communicate(timeout=300)
    return child.returncode, "".join(seen) + rest


def test_e2e_restore_interrupted_mid_extraction_returns_the_container_and_names_the_way_back(keeper, tmp_path):
    engine, platform = keeper
    volume = mountpoint(engine, "keeper-data")
    (volume / "big.bin").write_bytes(os.urandom(64 << 20))  # time enough to be interrupted while extracting
    proc = run_backup(engine, platform, MODULE, tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    archive = proc.stdout.split()[0]
    bad_apply(volume)
    broken = without_socket(walk(volume))

    returncode, err = interrupted_restore(engine, platform, archive, "restoring /data: emptying", 0.2)
    assert returncode == 130, err
    assert engine.inspect(MODULE)["State"]["Running"] is True  # started again, never left stopped
    way_back = re.search(r"the state before it is in (\S+); to go back to it: (python3 \S+ --restore \S+)", err)
    assert way_back, err
    assert err.strip().splitlines()[-1].endswith("the safety backup and the command that puts it back are above")

    back = run_tool(*shlex.split(way_back.group(2))[2:], "--yes", "--no-safety-backup", "--platform-root", str(platform), env=engine.env, timeout=600)
    assert back.returncode == 0, back.stdout + back.stderr
    assert without_socket(walk(volume)) == broken  # the state before the interrupted restore, exactly


def test_e2e_restore_class_b_interrupted_returns_redis_running_with_one_whole_dataset(docker_engine, tmp_path):
    engine, platform, _ = infisical_redis(docker_engine, tmp_path, True, extra="enable-debug-command yes")
    proc = run_backup(engine, platform, "infisical-redis", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    before = redis_digest(engine)
    engine.docker("exec", "-i", "-e", "REDISCLI_AUTH", "cache", "redis-cli", input=b"FLUSHALL\nSET after-the-backup 1\n",
                  env_extra={"REDISCLI_AUTH": REDIS_PASSWORD})
    broken = redis_digest(engine)

    returncode, err = interrupted_restore(engine, platform, proc.stdout.split()[0], "stopping container cache for the restore", 0.0)
    assert returncode == 130, err
    assert engine.inspect("cache")["State"]["Running"] is True, err
    logs = engine.docker("logs", "cache").stdout
    assert logs.count("Ready to accept connections") == 1 + logs.count("Received SIGTERM")  # if it was stopped, it was started again
    assert redis_digest(engine) in (before, broken)  # the backup's dataset or the one before, never half of each, never empty
    way_back = re.search(r"to go back to it: (python3 \S+ --restore \S+)", err)
    assert way_back, err
    back = run_tool(*shlex.split(way_back.group(1))[2:], "--yes", "--no-safety-backup", "--platform-root", str(platform), env=engine.env, timeout=600)
    assert back.returncode == 0, back.stdout + back.stderr
    assert redis_digest(engine) == broken


def test_e2e_restore_class_a_interrupted_mid_load_finishes_the_load_and_names_the_way_back(postgres, tmp_path):
    engine, platform, container = postgres
    psql(engine, container, "shop", "CREATE TABLE bulk AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 400000) g")
    proc = run_backup(engine, platform, "honcho-postgres", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    dump = proc.stdout.split()[0]
    psql(engine, container, "shop", "DROP TABLE bulk", "CREATE TABLE after_the_backup (x int)")
    broken = pg_state(engine, container)

    returncode, err = interrupted_restore(engine, platform, dump, "into the server of apps-honcho-postgres-1 with psql", 0.5)
    assert returncode == 130, err
    assert "an interrupt now takes effect once the load is done" in err
    assert pg_state(engine, container)["shop:public.bulk"] == "400000"  # the load ran to its end: no half-dropped cluster
    way_back = re.search(r"to go back to it: (python3 \S+ --restore \S+)", err)
    assert way_back, err
    back = run_tool(*shlex.split(way_back.group(1))[2:], "--yes", "--no-safety-backup", "--platform-root", str(platform), env=engine.env, timeout=600)
    assert back.returncode == 0, back.stdout + back.stderr
    assert pg_state(engine, container) == broken


# ---------------------------------------------------------------- class C (through the Vault stand-in)


def vault_state(engine) -> str:
    return engine.docker("exec", "vault", "sh", "-c", "cd /vault/data && for f in *; do echo \"$f $(cat $f)\"; done").stdout


def test_e2e_restore_class_c_snapshot_then_undo_and_force(docker_engine, tmp_path):
    engine, platform = vault_module(docker_engine, tmp_path)
    token = {**engine.env, "VAULT_TOKEN": VAULT_TOKEN}
    proc = run_tool("vault", "--platform-root", str(platform), "--backup-dir", str(tmp_path / "b"), env=token)
    assert proc.returncode == 0, proc.stderr
    snap = proc.stdout.split()[0]
    before = vault_state(engine)
    engine.docker("exec", "vault", "sh", "-c", "echo changed-by-the-apply > /vault/data/raft.db; echo new > /vault/data/after.db")
    broken = vault_state(engine)

    done = run_tool("--restore", snap, "--yes", "--platform-root", str(platform), env=token, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vault operator raft snapshot restore accepted" in done.stdout and "not compared" in done.stdout
    assert VAULT_TOKEN not in done.stdout + done.stderr
    assert vault_state(engine) == before
    assert engine.docker("exec", "vault", "sh", "-c", "ls /tmp | grep -c bba- || true").stdout.strip() == "0"  # the copy is gone

    safety = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("safety backup of the state before"))
    engine.docker("exec", "vault", "sh", "-c", "echo another-cluster > /vault/data/.standin-cluster")  # other unseal keys now
    refused = run_tool("--restore", safety, "--yes", "--no-safety-backup", "--platform-root", str(platform), env=token, timeout=300)
    assert refused.returncode == 1 and "--force-vault passes -force" in refused.stderr
    assert vault_state(engine) == before
    forced = run_tool("--restore", safety, "--yes", "--no-safety-backup", "--force-vault", "--platform-root", str(platform), env=token, timeout=300)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert vault_state(engine) == broken


# ---------------------------------------------------------------- class E through the engine


def as_docker_cp_keeps(tree: dict) -> dict:
    """What docker cp carries both ways: no holes (allocated blocks), of the xattrs only security.capability (README, Class E)."""
    kept = {}
    for name, (kind, mode, uid, gid, mtime, detail, xattrs) in without_socket(tree).items():
        if stat.S_ISREG(kind) and detail[0] != "hard link":
            detail = (detail[0], detail[2])
        kept[name] = (kind, mode, uid, gid, mtime, detail, tuple(x for x in xattrs if x[0] == "security.capability"))
    return kept


def test_e2e_restore_through_the_engine_with_via_docker(keeper, tmp_path):
    """What a remote engine gets: the mounts emptied by a helper container, the archive put back with docker cp."""
    engine, platform = keeper
    volume = mountpoint(engine, "keeper-data")
    proc = run_backup(engine, platform, MODULE, tmp_path / "b", "--via-docker")
    assert proc.returncode == 0, proc.stderr
    archive = proc.stdout.split()[0]
    before = as_docker_cp_keeps(walk(volume))
    bad_apply(volume)

    dry = restore(engine, platform, archive, "--via-docker", "--dry-run")
    assert dry.returncode == 0 and "would empty /data with a helper container of the same image" in dry.stdout
    done = restore(engine, platform, archive, "--via-docker", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "through the engine (--via-docker)" in done.stdout and "restored and compared: equal" in done.stdout
    after = as_docker_cp_keeps(walk(volume))
    assert after.pop("old")[4] == 0 and before.pop("old")[4] == -2  # docker cp sets a time before 1970 to the epoch (README)
    assert after == before
    assert not (volume / "new-after-the-backup").exists()
    assert engine.inspect(MODULE)["State"]["Running"] is True
    assert engine.docker("ps", "-aq", "--filter", f"ancestor={engine.inspect(MODULE)['Image']}").stdout.split() == [engine.inspect(MODULE)["Id"][:12]]


# ---------------------------------------------------------------- class D (through the mc stand-in)


def bucket_files(engine) -> dict[str, str]:
    out = engine.docker("exec", "minio", "sh", "-c", "cd /data && find docs photos extra -type f -exec sh -c 'echo \"$1 $(cat \"$1\") $(stat -c %Y \"$1\")\"' _ {} \\; 2>/dev/null || true").stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_e2e_restore_class_d_mirrors_back_keeps_new_objects_unless_asked(minio, tmp_path):
    engine, platform, alias = minio
    env = {**engine.env, **alias}
    proc = run_backup(engine, platform, "minio", tmp_path / "b", extra_env=alias)
    assert proc.returncode == 0, proc.stderr
    archive = proc.stdout.split()[0]
    before = bucket_files(engine)
    engine.docker("exec", "minio", "sh", "-c", "echo changed > /data/docs/b.pdf && rm /data/photos/2024/a.jpg && echo new > /data/docs/new.txt "
                  "&& mkdir -p /data/extra && echo e > /data/extra/e.txt")

    done = run_tool("--restore", archive, "--yes", "--platform-root", str(platform), env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert MINIO_SECRET not in done.stdout + done.stderr
    assert "bucket docs: all 2 object(s) of the backup listed by mc ls, with their sizes" in done.stdout
    assert "bucket docs: 1 object(s) created after the backup kept (--remove-extra removes them): new.txt" in done.stdout
    assert "left alone, not in the backup: bucket(s) extra" in done.stdout
    assert "bucket configuration imported from metadata/local-cluster-metadata.zip" in done.stdout
    now = bucket_files(engine)
    assert {k: v for k, v in now.items() if k in before} == before  # contents and --preserve'd times back
    assert "docs/new.txt" in now and "extra/e.txt" in now
    assert engine.docker("exec", "minio", "cat", "/data/.standin-imported").stdout.split() == ["docs", "photos"]
    assert engine.docker("exec", "minio", "sh", "-c", "ls /tmp | grep -c bba- || true").stdout.strip() == "0"

    again = run_tool("--restore", archive, "--yes", "--no-safety-backup", "--remove-extra", "--platform-root", str(platform), env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "docs/new.txt" not in bucket_files(engine) and "extra/e.txt" in bucket_files(engine)

    no_alias = run_tool("--restore", archive, "--yes", "--platform-root", str(platform), env=engine.env, timeout=300)
    assert no_alias.returncode == 3 and "no MINIO_MC_ALIAS in the environment" in no_alias.stderr


# ---------------------------------------------------------------- classes F and G: the steps, or class E


def test_e2e_restore_meilisearch_dump_prints_the_steps_and_refuses_its_archive_restores(meili, tmp_path):
    engine, platform, classes = meili
    proc = run_backup(engine, platform, "karakeep-meilisearch", tmp_path / "b", "--classes", str(classes))
    assert proc.returncode == 0, proc.stderr
    dump = proc.stdout.split()[0]
    started = engine.inspect("apps-meili-1")["State"]["StartedAt"]
    refused = restore(engine, platform, dump, "--yes", "--classes", str(classes))
    assert refused.returncode == 2, refused.stderr
    assert "docker stop apps-meili-1" in refused.stderr and f"--import-dump /meili_data/dumps/restore-{Path(dump).stem}.dump" in refused.stderr
    assert "bookmarks 2" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].endswith("nothing was touched. The exact steps are above")
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if not p.name.startswith(".")) == sorted(Path(p).name for p in proc.stdout.split())
    assert engine.inspect("apps-meili-1")["State"]["StartedAt"] == started

    archived = run_backup(engine, platform, "karakeep-meilisearch", tmp_path / "c")  # the origin's default: the mounted data
    assert archived.returncode == 0, archived.stderr
    engine.docker("exec", "apps-meili-1", "sh", "-c", "echo '{\"id\":3}' >> /meili_data/data.ms/bookmarks.jsonl")
    done = restore(engine, platform, archived.stdout.split()[0], "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored and compared: equal" in done.stdout
    assert engine.docker("exec", "apps-meili-1", "cat", "/meili_data/data.ms/bookmarks.jsonl").stdout == '{"id":1}\n{"id":2}\n'


def test_e2e_restore_class_g_prints_the_agaria_follow_up_and_refuses(agaria, tmp_path):
    engine, platform, root, _ = agaria
    proc = run_backup(engine, platform, "agaria-postgres", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    dry = restore(engine, platform, proc.stdout.split()[0], "--dry-run")
    refused = restore(engine, platform, proc.stdout.split()[0], "--yes")
    for attempt in (dry, refused):
        assert attempt.returncode == 2
        assert f"compose root {root}, containers agaria-agaria-postgres-1, agaria-agaria-redis-1" in attempt.stderr
        assert "docker compose up -d in the compose root" in attempt.stderr
        assert "Agaria-specific follow-up required: the origin design defers class G restores" in attempt.stderr.strip().splitlines()[-1]
