"""End to end, classes C and F: Vault and Meilisearch stand-ins and SearXNG in real containers.

Vault and Meilisearch cannot be installed here; tests/standins/ holds small programs that
follow their documented CLI and API. They run inside real containers on the private
engine, so everything on the docker side (exec, secrets by name, copy out, cleanup) is real.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, ArgvWatcher, run_tool, write_module
from conftest import run_backup as tool

STANDINS = REPO / "tests" / "standins"
STANDIN_PATH = "PATH=/opt/standins:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VAULT_TOKEN = "s.VaultRoot-7d1c"
MEILI_KEY = "meili-Master-55ab"


@pytest.fixture
def vault(docker_engine, tmp_path):
    return vault_module(docker_engine, tmp_path)


def vault_module(engine, tmp_path: Path):
    """Module vault: the Vault stand-in in a container, its raft data in a volume."""
    platform = tmp_path / "platform"
    write_module(platform, "vault", container="vault")
    engine.run_container("vault", "-v", "vault-data:/vault/data", "-v", f"{STANDINS}:/opt/standins:ro",
                         "-e", STANDIN_PATH, "-e", "VAULT_ADDR=http://127.0.0.1:8200")
    engine.docker("exec", "vault", "sh", "-c", f"echo {VAULT_TOKEN} > /vault/data/.standin-root-token; echo raft-data > /vault/data/raft.db")
    return engine, platform


def test_e2e_vault_snapshot_saved_copied_out_verified_and_cleaned(vault, tmp_path):
    engine, platform = vault
    with ArgvWatcher(VAULT_TOKEN) as watcher:
        proc = tool(engine, platform, "vault", tmp_path / "b", "--debug", extra_env={"VAULT_TOKEN": VAULT_TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert watcher.samples > 0 and watcher.hits == []
    snap, manifest = map(Path, proc.stdout.split())
    assert snap.name.endswith(".snap") and VAULT_TOKEN not in proc.stderr and VAULT_TOKEN not in manifest.read_text()
    doc = json.loads(manifest.read_text())
    assert doc["procedure"] == "vault-raft-snapshot" and doc["fallback_used"] is None and doc["format"] == "snap"
    assert doc["verification"]["vault_inspect"] == "ok" and doc["verification"]["sha256sums"] == "2 members match"
    assert engine.docker("exec", "vault", "ls", "/tmp").stdout.strip() == ""  # temporary snapshot removed
    with tarfile.open(snap) as tar:
        assert sorted(tar.getnames()) == ["SHA256SUMS", "meta.json", "state.bin"]
    assert run_tool("--verify", str(snap), env=engine.env).returncode == 0
    drill = run_tool("--drill", str(snap), env=engine.env)
    assert drill.returncode == 0, drill.stderr
    assert "structure, SHA256SUMS and contents listing only" in drill.stdout and "state.bin" in drill.stdout


@pytest.mark.parametrize(
    ("setup", "token", "reason"),
    [
        ("true", None, "no VAULT_TOKEN in the environment"),
        ("true", "s.wrong", "permission denied"),
        ("touch /vault/data/.standin-sealed", VAULT_TOKEN, "Vault is sealed"),
        ("touch /vault/data/.standin-not-raft", VAULT_TOKEN, "raft storage is not in use"),
    ],
    ids=["no-token", "bad-token", "sealed", "not-raft"],
)
def test_e2e_vault_falls_back_loudly(vault, tmp_path, setup, token, reason):
    engine, platform = vault
    engine.docker("exec", "vault", "sh", "-c", setup)
    proc = tool(engine, platform, "vault", tmp_path / "b", extra_env={"VAULT_TOKEN": token} if token else {})
    assert proc.returncode == 0, proc.stderr
    assert "VAULT-RAFT-SNAPSHOT NOT POSSIBLE" in proc.stderr and "--pause" in proc.stderr
    archive, manifest = map(Path, proc.stdout.split())
    doc = json.loads(manifest.read_text())
    assert doc["procedure"] == "vault-raft-snapshot" and doc["fallback_used"]["procedure"] == "mounted-archive"
    assert reason in doc["fallback_used"]["reason"]
    with tarfile.open(archive) as tar:
        assert "vault/data/raft.db" in tar.getnames()
    assert engine.docker("exec", "vault", "ls", "/tmp").stdout.strip() == ""


@pytest.fixture
def meili(docker_engine, tmp_path):
    return meili_module(docker_engine, tmp_path)


def meili_module(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "karakeep-meilisearch")
    engine.run_container("apps-meili-1", "--label", "com.docker.compose.service=karakeep-meilisearch",
                         "-v", "meili-data:/meili_data", "-v", f"{STANDINS}:/opt/standins:ro", "-w", "/meili_data",
                         "-e", f"MEILI_MASTER_KEY={MEILI_KEY}", command=("/opt/standins/meilisearch",))
    engine.docker("exec", "apps-meili-1", "sh", "-c", "mkdir -p /meili_data/data.ms && printf '{\"id\":1}\\n{\"id\":2}\\n' > /meili_data/data.ms/bookmarks.jsonl")
    engine.wait_for("apps-meili-1", ["curl", "-sf", "http://127.0.0.1:7700/health"])
    classes = tmp_path / "classes.toml"
    classes.write_text((REPO / "classes.toml").read_text().replace("meilisearch_dump = false", "meilisearch_dump = true"))
    return engine, platform, classes


def test_e2e_meilisearch_default_is_mounted_archive(meili, tmp_path):
    engine, platform, _ = meili
    proc = tool(engine, platform, "karakeep-meilisearch", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert "dump API not enabled" in proc.stderr
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert doc["format"] == "tar.gz" and doc["contents"]["engine"] == "meilisearch"


def test_e2e_meilisearch_dump_api(meili, tmp_path):
    engine, platform, classes = meili
    with ArgvWatcher(MEILI_KEY) as watcher:
        proc = tool(engine, platform, "karakeep-meilisearch", tmp_path / "b", "--classes", str(classes), "--debug")
    assert proc.returncode == 0, proc.stderr
    assert watcher.samples > 0 and watcher.hits == []
    dump, manifest = map(Path, proc.stdout.split())
    assert dump.name.endswith(".dump") and MEILI_KEY not in proc.stderr and MEILI_KEY not in manifest.read_text()
    doc = json.loads(manifest.read_text())
    assert doc["procedure"] == "search-engine" and doc["contents"]["engine"] == "meilisearch"
    assert doc["verification"]["dump_version"] == "V6" and doc["verification"]["members"] == 3
    assert doc["counts"] == {"documents": {"bookmarks": 2}} and doc["contents"]["server_documents"] == {"bookmarks": 2}
    assert engine.docker("exec", "apps-meili-1", "ls", "/meili_data/dumps").stdout.strip() == ""  # its dump removed
    with tarfile.open(dump) as tar:
        assert tar.extractfile("indexes/bookmarks/documents.jsonl").read() == b'{"id":1}\n{"id":2}\n'
    assert run_tool("--verify", str(dump), env=engine.env).returncode == 0
    drill = run_tool("--drill", str(dump), env=engine.env)
    assert drill.returncode == 0 and "contents listing only" in drill.stdout


def test_e2e_meilisearch_failed_dump_task_exit_1(meili, tmp_path):
    engine, platform, classes = meili
    engine.docker("exec", "apps-meili-1", "touch", "/meili_data/.standin-dump-fails")
    proc = tool(engine, platform, "karakeep-meilisearch", tmp_path / "b", "--classes", str(classes))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "backup-before-apply: error: Meilisearch dump task 0 failed: dump_process_failed "
        "An internal error has occurred. `No space left on device (os error 28)`."
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".karakeep-meilisearch.lock"]


def test_e2e_meilisearch_dump_missing_documents_the_server_reports_fails(meili, tmp_path):
    engine, platform, classes = meili
    engine.docker("exec", "apps-meili-1", "touch", "/meili_data/.standin-dump-drops")
    proc = tool(engine, platform, "karakeep-meilisearch", tmp_path / "b", "--classes", str(classes))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("backup-before-apply: error: the dump holds 1 documents of index 'bookmarks', "
                                                    "Meilisearch reports 2: not a complete backup")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".karakeep-meilisearch.lock"]
    assert engine.docker("exec", "apps-meili-1", "ls", "/meili_data/dumps").stdout.strip() == ""


def test_e2e_meilisearch_wrong_key_exit_1(meili, tmp_path):
    engine, platform, classes = meili
    engine.docker("stop", "apps-meili-1")
    engine.docker("rm", "apps-meili-1")
    engine.run_container("apps-meili-1", "--label", "com.docker.compose.service=karakeep-meilisearch",
                         "-v", "meili-data:/meili_data", "-v", f"{STANDINS}:/opt/standins:ro", "-w", "/meili_data",
                         "-e", "MEILI_MASTER_KEY=", command=("sh", "-c", "MEILI_MASTER_KEY=other exec /opt/standins/meilisearch"))
    engine.wait_for("apps-meili-1", ["curl", "-sf", "http://127.0.0.1:7700/health"])
    proc = tool(engine, platform, "karakeep-meilisearch", tmp_path / "b", "--classes", str(classes))
    assert proc.returncode == 1
    assert "Meilisearch refused the dump: HTTP 403: The provided API key is invalid." in proc.stderr


def test_e2e_searxng_config_only(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "searxng")
    config = tmp_path / "searxng"
    config.mkdir()
    (config / "settings.yml").write_text("server:\n  secret_key: 'abc'\n")
    (config / "limiter.toml").write_text("[botdetection]\n")
    engine.run_container("searxng", "-v", f"{config}:/etc/searxng", "-v", "searxng-cache:/var/cache/searxng")
    engine.docker("exec", "searxng", "sh", "-c", "head -c 50000 /dev/urandom > /var/cache/searxng/cache.db")
    proc = tool(engine, platform, "searxng", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert "SearXNG: backing up its configuration only (/etc/searxng); skipped: /var/cache/searxng" in proc.stderr
    archive, manifest = proc.stdout.split()
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["etc/searxng", "etc/searxng/limiter.toml", "etc/searxng/settings.yml"]
    doc = json.loads(Path(manifest).read_text())
    assert {"destination": "/var/cache/searxng", "reason": "not SearXNG configuration (cache or runtime data)"} in doc["skipped_mounts"]
    drill = run_tool("--drill", archive, env=engine.env)
    assert drill.returncode == 0, drill.stdout + drill.stderr


def test_standins_say_what_they_stand_in_for():
    for name in ("vault", "meilisearch", "mc"):
        text = (STANDINS / name).read_text()
        assert "Stand-in for" in text and "Never shipped with the tool." in text
        assert os.access(STANDINS / name, os.X_OK)


@pytest.fixture
def agaria(docker_engine, tmp_path):
    return agaria_module(docker_engine, tmp_path)


def agaria_module(docker_engine, tmp_path):
    """A separate compose project: PostgreSQL and Redis, with a compose root on this host."""
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "agaria-postgres")
    write_module(platform, "agaria-redis")
    root = tmp_path / "agaria"
    root.mkdir()
    (root / "compose.yaml").write_text("services:\n  agaria-postgres: {image: postgres}\n  agaria-redis: {image: redis}\n")
    (root / ".env").write_text("AGARIA_SECRET=in-the-compose-root\n")

    def labels(service, working_dir=root):
        return ["--label", "com.docker.compose.project=agaria", "--label", f"com.docker.compose.service={service}",
                "--label", f"com.docker.compose.project.working_dir={working_dir}",
                "--label", f"com.docker.compose.project.config_files={working_dir}/compose.yaml"]

    engine.run_postgres("agaria-agaria-postgres-1", *labels("agaria-postgres"), user="agaria", password="agaria-pw")
    engine.docker("exec", "agaria-agaria-postgres-1", "psql", "-q", "-U", "agaria", "-d", "postgres", "-c",
                  "CREATE TABLE farms AS SELECT g AS id FROM generate_series(1, 99) g")
    engine.run_redis("agaria-agaria-redis-1", *labels("agaria-redis"))
    engine.docker("exec", "agaria-agaria-redis-1", "redis-cli", "SET", "crop", "wheat")
    return engine, platform, root, labels


def test_e2e_agaria_postgres_compose_root_project_and_dump(agaria, tmp_path):
    engine, platform, root, _ = agaria
    with ArgvWatcher("agaria-pw") as watcher:
        proc = tool(engine, platform, "agaria-postgres", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert watcher.hits == []
    assert "Agaria-specific follow-up required" in proc.stderr
    archive, manifest = proc.stdout.split()
    doc = json.loads(Path(manifest).read_text())
    assert doc["procedure"] == "compose-root-archive" and doc["contents"]["also"] == "pg-dumpall"
    assert doc["contents"]["compose_root"] == str(root) and doc["contents"]["compose_project"] == "agaria"
    assert doc["contents"]["containers"] == ["agaria-agaria-postgres-1", "agaria-agaria-redis-1"]
    assert "Agaria-specific follow-up required" in doc["warnings"]
    assert doc["counts"]["postgres"]["row_counts"] == {"public.farms": 99}
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        dump = tar.extractfile("dumps/pg_dumpall.sql.gz").read()
    assert f"compose-root{root}/compose.yaml" in names and f"compose-root{root}/.env" in names
    assert "containers/agaria-agaria-postgres-1/var/lib/postgresql/data/PG_VERSION" in names
    assert "containers/agaria-agaria-redis-1/data" in names
    import gzip
    assert b"-- PostgreSQL database cluster dump complete" in gzip.decompress(dump)[-200:]
    assert not list((tmp_path / "b").glob("*.pgdump.sql.gz*"))  # the temporary dump is gone
    assert run_tool("--verify", archive, env=engine.env).returncode == 0
    drill = run_tool("--drill", archive, env=engine.env)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "Agaria-specific follow-up required" in drill.stdout and "dumps/pg_dumpall.sql.gz:" in drill.stdout


def test_e2e_agaria_redis_bgsave_first(agaria, tmp_path):
    engine, platform, _, _ = agaria
    proc = tool(engine, platform, "agaria-redis", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert doc["contents"]["also"] == "redis-bgsave" and doc["counts"] == {"db0": 1}
    assert doc["contents"]["bgsave"]["lastsave_after"] > doc["contents"]["bgsave"]["lastsave_before"]
    with tarfile.open(proc.stdout.split()[0]) as tar:
        assert "containers/agaria-agaria-redis-1/data/dump.rdb" in tar.getnames()


def test_e2e_agaria_compose_root_missing_falls_back(agaria, tmp_path):
    engine, platform, root, labels = agaria
    engine.docker("rm", "-f", "agaria-agaria-redis-1")
    engine.run_container("agaria-agaria-redis-1", *labels("agaria-redis", working_dir=tmp_path / "gone"), "-v", "agaria-cache:/data")
    proc = tool(engine, platform, "agaria-redis", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert "COMPOSE-ROOT-ARCHIVE NOT POSSIBLE" in proc.stderr
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert doc["procedure"] == "compose-root-archive" and doc["fallback_used"]["procedure"] == "mounted-archive"
    assert f"compose root {tmp_path / 'gone'} does not exist" in doc["fallback_used"]["reason"]
    assert "Agaria-specific follow-up required" in doc["warnings"]


MINIO_SECRET = "minio-Secret-31f0"


@pytest.fixture
def minio(docker_engine, tmp_path):
    return minio_module(docker_engine, tmp_path)


def minio_module(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "minio")
    engine.run_container("minio", "-v", "minio-data:/data", "-v", f"{STANDINS}:/opt/standins:ro", "-e", STANDIN_PATH,
                         "-e", "MINIO_ROOT_USER=admin", "-e", f"MINIO_ROOT_PASSWORD={MINIO_SECRET}")
    engine.docker("exec", "minio", "sh", "-c", "mkdir -p /data/photos/2024 /data/docs /data/.minio.sys && echo a > /data/photos/2024/a.jpg "
                  "&& echo b > /data/docs/b.pdf && echo c > /data/docs/c.txt && echo fmt > /data/.minio.sys/format.json "
                  "&& touch -d '2020-01-02 03:04:05' /data/docs/b.pdf")
    alias = {"MINIO_MC_ALIAS": "local", "MC_HOST_local": f"http://admin:{MINIO_SECRET}@127.0.0.1:9000"}
    return engine, platform, alias


def test_e2e_minio_mirror_every_bucket_staging_removed(minio, tmp_path):
    engine, platform, alias = minio
    with ArgvWatcher(MINIO_SECRET) as watcher:
        proc = tool(engine, platform, "minio", tmp_path / "b", "--debug", extra_env=alias)
    assert proc.returncode == 0, proc.stderr
    assert watcher.samples > 0 and watcher.hits == []
    archive, manifest = proc.stdout.split()
    assert MINIO_SECRET not in proc.stderr and MINIO_SECRET not in Path(manifest).read_text()
    doc = json.loads(Path(manifest).read_text())
    assert doc["procedure"] == "mc-mirror" and doc["counts"] == {"objects": {"docs": 2, "photos": 1}}
    assert doc["contents"]["mc"] == "container" and doc["contents"]["bucket_export"] == "ok"
    assert doc["contents"]["inventory"] == {"docs": "mc ls listed 2 objects; every one that is still there was mirrored",
                                            "photos": "mc ls listed 1 objects; every one that is still there was mirrored"}
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert tar.getmember("buckets/docs/b.pdf").mtime == 1577934245  # --preserve kept the object's time
    assert {"buckets/docs/b.pdf", "buckets/docs/c.txt", "buckets/photos/2024/a.jpg", "metadata/local-cluster-metadata.zip"} <= set(names)
    assert not any(".minio.sys" in n for n in names)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted([".minio.lock", Path(archive).name, Path(manifest).name])
    assert engine.docker("exec", "minio", "ls", "/tmp").stdout.strip() == ""
    assert run_tool("--verify", archive, env=engine.env).returncode == 0
    drill = run_tool("--drill", archive, env=engine.env)
    assert drill.returncode == 0 and "buckets/docs:" in drill.stdout


def test_e2e_minio_per_object_error_fails_and_cleans_up(minio, tmp_path):
    engine, platform, alias = minio
    engine.docker("exec", "minio", "sh", "-c", "echo docs/c.txt > /data/.standin-broken")
    proc = tool(engine, platform, "minio", tmp_path / "b", extra_env=alias)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "backup-before-apply: error: mc mirror local/docs: 1 error(s), first: "
        "Failed to copy `local/docs/c.txt`. We encountered an internal error, please try again."
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".minio.lock"]
    assert engine.docker("exec", "minio", "ls", "/tmp").stdout.strip() == ""


def test_e2e_minio_mirror_leaving_an_object_out_is_caught_by_the_listing(minio, tmp_path):
    engine, platform, alias = minio
    engine.docker("exec", "minio", "sh", "-c", "echo photos/2024/a.jpg > /data/.standin-skipped")
    proc = tool(engine, platform, "minio", tmp_path / "b", extra_env=alias)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("backup-before-apply: error: mc mirror left out 1 objects of bucket photos that are there "
                                                    "(first: 2024/a.jpg); not a complete backup")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".minio.lock"]
    assert engine.docker("exec", "minio", "ls", "/tmp").stdout.strip() == ""


def test_e2e_minio_bad_credentials_exit_1(minio, tmp_path):
    engine, platform, alias = minio
    proc = tool(engine, platform, "minio", tmp_path / "b", extra_env={**alias, "MC_HOST_local": "http://admin:wrong@127.0.0.1:9000"})
    assert proc.returncode == 1
    assert "mc ls local: 1 error(s), first: Unable to list folder. The Access Key Id you provided does not exist" in proc.stderr


def test_e2e_minio_without_alias_falls_back_loudly(minio, tmp_path):
    engine, platform, _ = minio
    proc = tool(engine, platform, "minio", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert "MC-MIRROR NOT POSSIBLE (no MINIO_MC_ALIAS in the environment)" in proc.stderr
    assert "same release and drive layout" in proc.stderr
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert doc["procedure"] == "mc-mirror" and doc["fallback_used"] == {"procedure": "mounted-archive", "reason": "no MINIO_MC_ALIAS in the environment"}
    assert run_tool("--verify", proc.stdout.split()[0], env=engine.env).returncode == 0  # read as the archive it is


def test_e2e_minio_mc_on_the_host(minio, tmp_path):
    engine, platform, alias = minio
    data = next(m["Source"] for m in engine.inspect("minio")["Mounts"] if m["Destination"] == "/data")
    host_env = {**alias, "PATH": f"{STANDINS}:{os.environ['PATH']}", "STANDIN_MINIO_DATA": data,
                "MINIO_ROOT_USER": "admin", "MINIO_ROOT_PASSWORD": MINIO_SECRET}
    proc = tool(engine, platform, "minio", tmp_path / "b", extra_env=host_env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert doc["contents"]["mc"] == "host" and doc["counts"] == {"objects": {"docs": 2, "photos": 1}}
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")) == [".minio.lock"]

    # The restore through the host's mc: the archive unpacked into a staging directory beside it, in
    # the one pass that also lists its objects; the server read back with mc ls; the staging removed.
    before = {p.relative_to(data).as_posix(): p.read_bytes() for p in Path(data).rglob("*")
              if p.is_file() and p.relative_to(data).parts[0] in ("docs", "photos")}
    assert sorted(before) == ["docs/b.pdf", "docs/c.txt", "photos/2024/a.jpg"]
    Path(data, "docs", "b.pdf").write_bytes(b"changed")
    Path(data, "photos", "2024", "a.jpg").unlink()
    done = run_tool("--restore", proc.stdout.split()[0], "--yes", "--no-safety-backup", "--platform-root", str(platform),
                    env={**engine.env, **host_env}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bucket docs: all 2 object(s) of the backup listed by mc ls, with their sizes" in done.stdout
    assert "bucket photos: all 1 object(s) of the backup listed by mc ls, with their sizes" in done.stdout
    assert {name: Path(data, name).read_bytes() for name in before} == before
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")) == [".minio.lock"]


def test_e2e_dry_run_shows_engine_commands_and_touches_nothing(vault, tmp_path):
    engine, platform = vault
    proc = tool(engine, platform, "vault", tmp_path / "b", "--dry-run", extra_env={"VAULT_TOKEN": VAULT_TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert "would run: docker exec -e VAULT_ADDR -e VAULT_TOKEN vault vault operator raft snapshot save /tmp/bba-vault-" in proc.stdout
    assert VAULT_TOKEN not in proc.stdout + proc.stderr
    assert not (tmp_path / "b").exists()
    assert engine.docker("exec", "vault", "ls", "/tmp").stdout.strip() == ""
    without = tool(engine, platform, "vault", tmp_path / "b", "--dry-run")
    assert "would fall back to mounted-archive: no VAULT_TOKEN in the environment" in without.stdout
    assert "would read: " in without.stdout and "-> /vault/data (volume)" in without.stdout
