"""The image itself: docker/Dockerfile built with buildah (CPU torch, on a local Debian 12 base), then run as
the Job's pod runs it: UID 10001, the image's own environment, no network, a read-only root with /storage,
/tmp and /home/app writable. It answers --help, checks a storage tree, trains and merges the demo.

Needs root (buildah's chroot isolation, debootstrap) and buildah, debootstrap and ip on PATH:
`./dev.sh test` installs them. Building takes 10-15 minutes the first time; later runs reuse the base, the
layer cache and an image built from the same inputs (.image-test/). Deselect with `-m "not image"`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_build import (
    BUILD_HOME,
    BuildahFailed,
    PipSources,
    Pod,
    base_image,
    build_command,
    build_image,
    buildah,
    context_files,
    leftovers,
    pip_sources,
    pod,
    remove_working_containers,
)

from entrypoint.errors import ExitCode
from entrypoint.tinymodel import write_demo_data

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parent.parent
UID = GID = 10001
WRITABLE = ("/storage", "/tmp", "/home/app")  # base/job-train.yaml volumeMounts


def config_map() -> dict[str, str]:
    """The ConfigMap llm-config's values (base/llm-config.env), as envFrom gives them to the pod."""
    lines = (REPO / "base" / "llm-config.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the image tests run as root (buildah --isolation chroot, debootstrap), as CI does")
    for tool in ("buildah", "debootstrap", "ip", "unshare"):
        assert shutil.which(tool), f"{tool} not found on PATH: `./dev.sh test` installs it"
    remove_working_containers()
    return tmp_path_factory.mktemp("image-build")


@pytest.fixture(scope="module")
def base(logs: Path) -> str:
    started = time.monotonic()
    name = base_image(logs / "debootstrap.log")
    print(f"base {name} ready in {time.monotonic() - started:.0f} s")
    return name


@pytest.fixture(scope="module")
def image(base: str, logs: Path) -> str:
    started = time.monotonic()
    built = build_image(base, logs / "build.log")
    print(f"image {built} ready in {time.monotonic() - started:.0f} s (logs: {logs})")
    return built


@pytest.fixture(scope="module")
def pod_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Host folders for the pod's writable mounts, owned by the pod's user like its volumes."""
    root = tmp_path_factory.mktemp("pod")
    dirs = {target: root / target.strip("/").replace("/", "-") for target in WRITABLE}
    for folder in dirs.values():
        folder.mkdir()
        os.chown(folder, UID, GID)
    return dirs


@pytest.fixture(scope="module")
def job(image: str, pod_dirs: dict[str, Path]) -> Iterator[Pod]:
    with pod(image, pod_dirs) as running:
        yield running
    # Nothing of the tests' runs stays behind: no working container, no mount.
    assert leftovers() == []


def chown_tree(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, UID, GID, follow_symlinks=False)


def test_the_build_reads_the_hosts_package_sources_through_mounts_of_its_own(tmp_path: Path) -> None:
    wheels, index, cert = tmp_path / "wheels", tmp_path / "pypi" / "simple", tmp_path / "ca.crt"
    wheels.mkdir()
    index.mkdir(parents=True)
    cert.write_text("")
    listing = (f":env:.find-links='{wheels}'\nglobal.find-links='/elsewhere'\n"
               f"global.extra-index-url='file://{index} https://mirror.example/simple'\n"
               f"global.cert='{cert}'\nglobal.constraint='/etc/caps.txt'\n")
    sources = pip_sources(listing)
    top = f"/{tmp_path.parts[1]}"  # a file:// index links to files relative to itself: its whole tree goes in
    assert sources.mounts == [(top, f"{BUILD_HOME}/host{top}"), (str(cert), f"{BUILD_HOME}/host-ca.crt")]
    assert sources.index_url == "https://pypi.org/simple"
    assert sources.conf.splitlines() == [
        "[global]",
        f"extra-index-url = file://{BUILD_HOME}/host{index} https://mirror.example/simple",
        f"find-links = {BUILD_HOME}/host{wheels}",  # the PIP_FIND_LINKS variable wins, as in pip
        f"cert = {BUILD_HOME}/host-ca.crt",
    ]


def test_the_build_is_invoke_builds_command_plus_the_test_builds_needs(tmp_path: Path) -> None:
    sources = PipSources("https://pypi.org/simple", "", [("/opt", f"{BUILD_HOME}/host/opt"),
                                                         ("/etc/ca.crt", f"{BUILD_HOME}/host-ca.crt")])
    argv = build_command("localhost/base:1", "f" * 40, sources, tmp_path)
    assert argv[:6] == ["bud", "--isolation", "chroot", "--format", "docker", "--platform"]
    assert "BASE_IMAGE=localhost/base:1" in argv and "TORCH_VARIANT=cpu" in argv
    assert "/opt:/root/host/opt:ro" in argv and "/etc/ca.crt:/root/host-ca.crt:ro" in argv
    # The host's CA bundle never replaces the image's own (dpkg writes that one).
    assert not any(arg.endswith(":/etc/ssl/certs/ca-certificates.crt") for arg in argv)
    assert argv[-1] == "."


def test_the_image_is_rebuilt_when_a_file_of_its_context_changes() -> None:
    files = {str(path.relative_to(REPO)) for path in context_files()}
    assert {"requirements.lock", "pyproject.toml", "README.md", "entrypoint/cli.py"} <= files
    assert not any(name.startswith(("tests/", "docs/", ".venv")) or "__pycache__" in name for name in files)


def test_a_failed_build_shows_buildahs_last_lines_and_leaves_no_container(base: str, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN echo the last words before failing && false\n")
    before = leftovers()
    with pytest.raises(BuildahFailed) as failed:
        buildah("bud", "--isolation", "chroot", "--layers", "--force-rm", "--tag", "localhost/broken:1",
                str(tmp_path))
    assert "the last words before failing" in str(failed.value)
    assert leftovers() == before


def test_help_runs_as_the_pods_user_with_the_images_environment(job: Pod) -> None:
    result = job.run("python", "-m", "entrypoint", "--help")
    assert result.returncode == 0, result.stderr
    assert "Exit codes:" in result.stdout
    probe = job.run("sh", "-c", 'id -u; id -g; echo "$HOME $VIRTUAL_ENV $HF_HUB_OFFLINE"; command -v python')
    assert probe.stdout.split("\n")[:4] == ["10001", "10001", "/home/app /opt/venv 1", "/opt/venv/bin/python"]


def test_the_installed_set_is_consistent(job: Pod) -> None:
    result = job.run("python", "-m", "pip", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No broken requirements found." in result.stdout


def test_check_reads_a_mounted_storage_tree_with_the_config_maps_values(
    job: Pod, pod_dirs: dict[str, Path], tiny_model: Path
) -> None:
    storage = pod_dirs["/storage"]
    shutil.copytree(tiny_model, storage / "models" / "base-model")
    write_demo_data(storage / "data")
    chown_tree(storage)
    # /dev is the host's (read-only) under chroot isolation: the termination log goes to /tmp instead.
    env = {**config_map(), "TRACKING": "none", "TERMINATION_LOG_PATH": "/tmp/termination-log"}
    result = job.run("python", "-m", "entrypoint", "check", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["decision"] == "start"
    assert report["output"] == "/storage/output/lora-adapter"
    assert report["llamafactory_args"]["model_name_or_path"] == "/storage/models/base-model"
    assert not (storage / "output").exists()  # check writes nothing

    bad = job.run("python", "-m", "entrypoint", "check", env={**env, "LORA_RANK": "zero"})
    assert bad.returncode == ExitCode.CONFIG
    assert "LORA_RANK" in (pod_dirs["/tmp"] / "termination-log").read_text()


def test_the_demo_trains_and_merges_on_mounted_storage(job: Pod, pod_dirs: dict[str, Path]) -> None:
    result = job.run("python", "-m", "entrypoint", "demo", "--storage", "/storage", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[match]" in result.stdout  # the merged model answers what it was trained on
    storage = pod_dirs["/storage"]
    merged = storage / "models" / "merged-model"
    assert merged.is_symlink() and (merged / "config.json").is_file()
    assert (storage / "output" / "lora-adapter" / ".job" / "COMPLETE.json").is_file()
    assert merged.resolve().stat().st_uid == UID  # written by the pod's user, as on the NFS volume
    # MLflow's usage telemetry stays off: its client never started (it would store an installation id).
    assert not (pod_dirs["/home/app"] / ".config" / "mlflow").exists()


WRITABLE_PROBE = r"""
import json, os, sys
skip = {"/proc", "/sys", "/dev"}
found = []
for top, dirs, files in os.walk("/"):
    dirs[:] = sorted(d for d in dirs if os.path.join(top, d) not in skip
                     and not os.path.islink(os.path.join(top, d)))
    if os.access(top, os.W_OK):
        found.append(top)
        dirs[:] = []  # below a writable folder: the folder says it
        continue
    found += [os.path.join(top, f) for f in files if os.access(os.path.join(top, f), os.W_OK)]
print(json.dumps(found))
"""


def test_the_pods_user_writes_only_to_its_writable_mounts(job: Pod, image: str) -> None:
    # The pod's view (read-only root): exactly the three mounts.
    result = job.run("python", "-c", WRITABLE_PROBE)
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == sorted(WRITABLE)
    # The image itself, without a read-only root (docker run, a cluster that does not enforce it): UID 10001
    # owns only its HOME; the venv, /usr, /etc and / are root's. Debian's world-writable /tmp, /var/tmp and
    # /run/lock (sticky) remain.
    with pod(image, {}) as plain:
        result = plain.run("python", "-c", WRITABLE_PROBE, read_only=False)
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == ["/home/app", "/run/lock", "/tmp", "/var/tmp"]


def test_no_working_container_or_mount_is_left_behind(image: str) -> None:
    with pod(image, {}) as running:
        assert running.container in leftovers()
        assert str(running.rootfs) in leftovers()
        assert running.run("true").returncode == 0
    assert running.container not in leftovers()
    assert str(running.rootfs) not in leftovers()
