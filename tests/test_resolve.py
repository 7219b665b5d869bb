"""Container resolution rules, in order, with ambiguity as an error."""

from __future__ import annotations

import threading
import time

import pytest

import backup_before_apply as bba
from conftest import fake_container, write_module


def module(platform, module_id="kuma", runbook=None, **fields):
    return bba.read_module(write_module(platform, module_id, runbook=runbook, **fields))


def test_resolve_container_explicit_flag_wins(platform):
    mod = module(platform, container="declared")
    containers = [fake_container("declared"), fake_container("chosen"), fake_container("kuma")]
    got = bba.resolve_container(mod, containers, explicit="chosen")
    assert (got.name, got.rule) == ("chosen", "--container")


def test_resolve_container_explicit_by_id_prefix(platform):
    target = fake_container("chosen")
    got = bba.resolve_container(module(platform), [target], explicit=target["Id"][:12])
    assert got.name == "chosen"


def test_resolve_container_explicit_missing_is_not_found(platform):
    with pytest.raises(bba.ContainerNotFound, match="--container ghost: no such container"):
        bba.resolve_container(module(platform), [fake_container("kuma")], explicit="ghost")


def test_resolve_container_module_yaml_beats_label_and_name(platform):
    mod = module(platform, container="declared")
    containers = [fake_container("kuma"), fake_container("x", labels={"com.docker.compose.service": "kuma"}), fake_container("declared")]
    got = bba.resolve_container(mod, containers)
    assert (got.name, got.rule) == ("declared", "module.yaml spec.runtime.container")


def test_resolve_container_declared_but_missing_does_not_fall_through(platform):
    mod = module(platform, container="declared")
    with pytest.raises(bba.ContainerNotFound, match="spec.runtime.container 'declared': no such container"):
        bba.resolve_container(mod, [fake_container("kuma")])


def test_resolve_container_compose_label_beats_name(platform):
    containers = [fake_container("kuma"), fake_container("apps-kuma-1", labels={"com.docker.compose.service": "kuma"})]
    got = bba.resolve_container(module(platform), containers)
    assert (got.name, got.rule) == ("apps-kuma-1", "compose label com.docker.compose.service")


def test_resolve_container_two_labelled_is_ambiguous_listing_both(platform):
    containers = [
        fake_container("apps-kuma-2", labels={"com.docker.compose.service": "kuma"}),
        fake_container("apps-kuma-1", labels={"com.docker.compose.service": "kuma"}),
        fake_container("kuma"),
    ]
    with pytest.raises(bba.AmbiguousContainer) as info:
        bba.resolve_container(module(platform), containers)
    assert "2 containers match by compose label com.docker.compose.service: apps-kuma-1, apps-kuma-2" in str(info.value)
    assert info.value.exit_code == bba.EXIT_USAGE


def test_resolve_container_exact_name(platform):
    got = bba.resolve_container(module(platform), [fake_container("kuma-old"), fake_container("kuma")])
    assert (got.name, got.rule) == ("kuma", "container name")


def test_resolve_container_runbook_names_that_exist(platform):
    runbook = "Check:\n\n    sudo docker exec -it -e X=1 --user 0 kuma-app sh\n    docker logs --tail 50 gone\n"
    got = bba.resolve_container(module(platform, runbook=runbook), [fake_container("kuma-app")])
    assert (got.name, got.rule) == ("kuma-app", "runbook runbook.md")


def test_resolve_container_runbook_two_existing_is_ambiguous(platform):
    runbook = "docker exec a sh\ndocker restart b\n"
    with pytest.raises(bba.AmbiguousContainer, match="a, b"):
        bba.resolve_container(module(platform, runbook=runbook), [fake_container("a"), fake_container("b")])


def test_resolve_container_nothing_matches(platform):
    with pytest.raises(bba.ContainerNotFound, match="no container found"):
        bba.resolve_container(module(platform, runbook="no commands here"), [fake_container("other")])


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("docker exec -it postgres psql -U app", ["postgres"]),
        ("docker logs -f --tail 100 redis-1", ["redis-1"]),
        ("docker inspect --format '{{json .State}}' vault", ["vault"]),
        ("docker restart -t 30 minio", ["minio"]),
        ("`docker exec kuma ls` and docker logs kuma", ["kuma"]),
        ("docker compose exec app sh", []),
        ("docker ps; docker run --name x img", []),
        ("docker exec --env=A=b --workdir=/x app true", ["app"]),
    ],
)
def test_runbook_container_names(text, names):
    assert bba.runbook_container_names(text) == names


def test_containers_and_engine_asks_docker_both_things_at_once_and_raises_either_error(fake_docker, monkeypatch):
    fake = fake_docker(fake_container("app"), fake_container("db"))
    together = threading.Barrier(2, timeout=10)  # broken (and the test failed) if one call waited for the other to end

    def meet(argv, **kwargs):
        if argv[1] in ("ps", "info"):
            together.wait()
        return fake(argv, **kwargs)

    monkeypatch.setattr(bba, "run", meet)
    containers, engine = bba.containers_and_engine(5)
    assert sorted(c["Name"] for c in containers) == ["/app", "/db"] and engine.version == "99.0-fake" and engine.local
    assert sorted(fake.subcommands()) == ["context", "info", "inspect", "ps"]
    monkeypatch.setattr(bba, "run", fake)
    fake.fail_on["info"] = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock"
    with pytest.raises(bba.CommandError, match="docker info"):
        bba.containers_and_engine(5)
    fake.fail_on = {"ps": "permission denied while trying to connect to the Docker daemon socket"}
    with pytest.raises(bba.CommandError, match="docker ps"):
        bba.containers_and_engine(5)
    # A docker info that hangs (a stuck engine) does not hold back the error of docker ps.
    release = threading.Event()

    def hang_on_info(argv, **kwargs):
        if argv[1] == "info":
            release.wait(30)
        return fake(argv, **kwargs)

    monkeypatch.setattr(bba, "run", hang_on_info)
    started = time.monotonic()
    try:
        with pytest.raises(bba.CommandError, match="docker ps"):
            bba.containers_and_engine(5)
        assert time.monotonic() - started < 10
    finally:
        release.set()
