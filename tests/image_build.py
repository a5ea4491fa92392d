"""Build docker/Dockerfile with buildah, and run the image the way the pods run it (tests/test_image.py).

No container registry is reachable in CI, so the base comes from Debian's mirror: bookworm from debootstrap
(--variant=minbase) with Debian's python3, python3-venv and python-is-python3, committed with buildah. The
image is then built with `invoke build --builder buildah`'s own command and CPU torch. What is safe to keep
is kept, keyed by its inputs: the base (its tag is their digest), buildah's layer cache, and the image itself
(a label holds the digest of the Dockerfile, the context's files and the build command). All of it lives in
a buildah store of the checkout's own (.image-test/), so pruning never touches other images.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from k8s_tasks.image import DOCKERFILE, ImageRef, build_plan

REPO = Path(__file__).resolve().parent.parent
STORE = REPO / ".image-test"
# buildah's run state (locks, mount counts) belongs on a tmpfs: a reboot clears it with the mounts it tracks.
RUN_STATE = Path("/run") / f"llamafactory-k8s-image-test-{hashlib.sha256(str(REPO).encode()).hexdigest()[:8]}"

BASE_REPOSITORY = "localhost/llamafactory-k8s-test/debian-python"
DEBIAN_SUITE = "bookworm"  # Debian 12, what the Dockerfile's default base is made from
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3")
IMAGE = ImageRef("localhost/llamafactory-k8s-test/llama-factory-train", tag="cpu")
# The image's label holding the digest of what it was built from (inputs_digest).
INPUTS_LABEL = "llamafactory-k8s.test.inputs"

# The pods' user (base/job-train.yaml runAsUser/runAsGroup).
POD_USER = "10001:10001"
# Where the build's HOME (/root) holds the pip configuration, the host's CA bundle and the host's local
# package sources: a temporary folder of the host, so none of it ends up in a layer.
BUILD_HOME = "/root"
# Files buildah mounts into every container; it must find them when the image's directories are read-only.
RUNTIME_MOUNTPOINTS = ("run/.containerenv", "etc/hosts", "etc/hostname", "etc/resolv.conf")


class BuildahFailed(AssertionError):
    """A buildah (or debootstrap) command failed; the message holds the command and its last lines."""


def buildah_argv(*args: str) -> list[str]:
    return ["buildah", "--root", str(STORE / "storage"), "--runroot", str(RUN_STATE), *args]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a command and everything it started (its own session): SIGTERM lets buildah remove its working
    container and mounts; SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def communicate(proc: subprocess.Popen, timeout: float) -> tuple[str | None, str | None]:
    """proc's output; on timeout (TimeoutExpired) or an interrupt, the command is stopped first."""
    try:
        return proc.communicate(timeout=timeout)
    except BaseException:
        _stop(proc)
        raise


def _run(argv: list[str], *, log: Path | None = None, timeout: float = 300, cwd: Path = REPO) -> str:
    """Run a command to completion in a session of its own; its stdout, else BuildahFailed with the last
    lines it printed (a log file holds them all)."""
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(argv, stdout=out if log else subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=cwd, start_new_session=True)
        try:
            stdout, _ = communicate(proc, timeout)
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            stdout, code = None, f"timed out after {timeout:.0f} s"
    text = log.read_text(errors="replace") if log else (stdout or "")
    if code != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise BuildahFailed(f"`{' '.join(argv)}` failed ({code}); its last lines:\n{tail}")
    return text.strip()


def buildah(*args: str, **kwargs) -> str:
    return _run(buildah_argv(*args), **kwargs)


def image_exists(name: str) -> bool:
    return subprocess.run(buildah_argv("inspect", "--type", "image", name), capture_output=True,
                          check=False).returncode == 0


def images(repository: str) -> list[str]:
    """The tags (repository:tag) of a repository in the store."""
    listing = buildah("images", "--json")
    names = [name for image in json.loads(listing or "[]") for name in image.get("names") or []]
    return [name for name in names if name.rsplit(":", 1)[0] == repository]


# --- the base image -----------------------------------------------------------------------------------------


def _make_base(name: str, log: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        try:
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                  f"--keyring={DEBIAN_KEYRING}", DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR], log=log, timeout=900)
        finally:
            unmount_below(rootfs)  # debootstrap mounts /proc and /sys in the target; a failure can leave them
        # Package lists and downloaded .debs are not part of a base image; the host's resolver settings
        # neither (a container runtime mounts its own).
        for junk in ("var/lib/apt/lists", "var/cache/apt"):
            shutil.rmtree(rootfs / junk)
            (rootfs / junk).mkdir()
        (rootfs / "etc" / "resolv.conf").write_text("")
        container = buildah("from", "scratch")
        try:
            mountpoint = buildah("mount", container)
            _run(["cp", "-a", f"{rootfs}/.", mountpoint])
            buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--cmd", "/bin/bash", container)
            buildah("commit", "--quiet", container, name)
        finally:
            buildah("rm", container)


def base_image(log: Path) -> str:
    """The local Debian base, built once per set of inputs (the tag is their digest) and kept in the store."""
    inputs = json.dumps([DEBIAN_SUITE, DEBIAN_MIRROR, BASE_PACKAGES, inspect.getsource(_make_base)])
    name = f"{BASE_REPOSITORY}:{hashlib.sha256(inputs.encode()).hexdigest()[:16]}"
    if not image_exists(name):
        _make_base(name, log)
        for stale in set(images(BASE_REPOSITORY)) - {name}:
            buildah("rmi", stale)
    return name


# --- the host's package sources, for pip inside the build ---------------------------------------------------


@dataclass
class PipSources:
    """The host's pip settings translated for the build: where the index is, the pip.conf the build reads,
    and the host paths it needs mounted (read-only) to read them."""

    index_url: str
    conf: str
    mounts: list[tuple[str, str]] = field(default_factory=list)


def _pip_settings(listing: str) -> dict[str, str]:
    """`pip config list`'s output as pip applies it to `pip install`: PIP_* variables, then [install], then
    [global]."""
    found: dict[str, dict[str, str]] = {}
    for scope, key, value in re.findall(r"^([^.\n]*)\.([^=\n]+)='(.*)'$", listing, re.MULTILINE):
        found.setdefault(key, {})[scope] = value
    return {key: next(values[s] for s in (":env:", "install", "global") if s in values)
            for key, values in found.items() if {":env:", "install", "global"} & values.keys()}


def host_pip_sources() -> PipSources:
    """Where this machine's pip installs from: what installed the tests' own environment."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    return pip_sources(listing)


def pip_sources(listing: str, default_cert: str = "/etc/ssl/certs/ca-certificates.crt") -> PipSources:
    """The settings of a `pip config list` (index, extra indexes, find-links, CA bundle) made usable inside
    the build: a local folder is mounted read-only below BUILD_HOME with its top-level folder (a file://
    index links to files relative to itself), and the CA bundle comes along at a path of its own."""
    settings = _pip_settings(listing)
    mounts: dict[str, str] = {}

    def inside(location: str) -> str | None:
        url = urlparse(location)
        if url.scheme not in ("", "file"):
            return location
        path = Path(url.path)
        if not path.is_absolute() or not path.exists():
            return None  # pip would ignore it too
        top = f"/{path.parts[1]}"
        mounts[top] = f"{BUILD_HOME}/host{top}"
        moved = f"{BUILD_HOME}/host{path}"
        return f"file://{moved}" if url.scheme else moved

    def translate(key: str) -> list[str]:
        return [loc for value in settings.get(key, "").split() if (loc := inside(value))]

    index_url = (translate("index-url") or ["https://pypi.org/simple"])[0]
    lines = ["[global]"]
    for key in ("extra-index-url", "find-links"):
        if locations := translate(key):
            lines.append(f"{key} = {' '.join(locations)}")
    if trusted := settings.get("trusted-host"):
        lines.append(f"trusted-host = {trusted}")
    cert = settings.get("cert") or default_cert
    volumes = [(host, path) for host, path in sorted(mounts.items())]
    if Path(cert).is_file():
        lines.append(f"cert = {BUILD_HOME}/host-ca.crt")
        volumes.append((cert, f"{BUILD_HOME}/host-ca.crt"))
    # The host's `constraint` is not carried over: the Dockerfile installs exact pins.
    return PipSources(index_url, "\n".join(lines) + "\n", volumes)


# --- the image ------------------------------------------------------------------------------------------------


def build_command(base: str, revision: str, sources: PipSources, home: Path, target: str | None = None) -> list[str]:
    """`invoke build --builder buildah --base-image BASE --torch-variant cpu`'s command, plus what only the test
    build needs: the layer cache, the torch index the host reaches, and the host's package sources. With a
    target, the command builds (and tags) only that stage."""
    (argv,) = build_plan(IMAGE, revision, builder="buildah", base_image=base, torch_variant="cpu").commands()
    *options, context = argv[1:]
    extra = ["--layers", "--force-rm", "--build-arg", f"TORCH_INDEX_URL={sources.index_url}",
             "--volume", f"{home}:{BUILD_HOME}"]
    for host, path in sources.mounts:
        extra += ["--volume", f"{host}:{path}:ro"]
    if target:
        options[options.index("--tag") + 1] = f"{IMAGE}-{target}-stage"
        extra += ["--target", target]
    return [*options, *extra, context]


def context_files() -> list[Path]:
    """The build context's files: what .dockerignore lets back in after excluding everything."""
    entries = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    files = []
    for path in (REPO / entry for entry in entries):
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [f for f in found if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
    return files


def inputs_digest(base: str, sources: PipSources) -> str:
    """Everything the image is made of: the build command (less the commit label), the Dockerfile, the
    context's files, and where pip installs from."""
    digest = hashlib.sha256()
    command = build_command(base, "", sources, Path(BUILD_HOME))
    for part in (json.dumps(command), sources.conf, (REPO / DOCKERFILE).read_text()):
        digest.update(part.encode() + b"\0")
    for path in context_files():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def image_label(name: str, key: str) -> str | None:
    if not image_exists(name):
        return None
    config = json.loads(buildah("inspect", "--type", "image", name))["OCIv1"]["config"]
    return (config.get("Labels") or {}).get(key)


def remove_working_containers() -> None:
    """Remove every working container of the tests' store, with its mounts: what a run that was killed
    before its teardown left."""
    buildah("rm", "--all")


def build_image(base: str, log: Path) -> str:
    """The image: the one in the store when it was built from the same inputs, else built (cached layers are
    reused), then the layers only earlier builds used are dropped."""
    sources = host_pip_sources()
    inputs = inputs_digest(base, sources)
    if image_label(str(IMAGE), INPUTS_LABEL) == inputs:
        return str(IMAGE)
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip() or "unknown"
    with tempfile.TemporaryDirectory(prefix="build-home-") as home:
        (Path(home) / ".config" / "pip").mkdir(parents=True)
        (Path(home) / ".config" / "pip" / "pip.conf").write_text(sources.conf)
        *command, context = build_command(base, revision, sources, Path(home))
        buildah(*command, "--label", f"{INPUTS_LABEL}={inputs}", context, log=log, timeout=3600)
        # The build stage's last layer has no tag and no child, so a prune would take the whole stage's
        # cache; tagging it (all layers cached: seconds) keeps it.
        buildah(*build_command(base, revision, sources, Path(home), target="build"), log=log.with_suffix(".stage.log"),
                timeout=600)
    prune()
    return str(IMAGE)


def prune() -> None:
    """Remove untagged images without children (layers only earlier builds used), until none is left."""
    while buildah("rmi", "--prune"):
        pass


# --- running the image like a pod ---------------------------------------------------------------------------


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below path, deepest last (as /proc/self/mountinfo lists them)."""
    prefix = str(path).rstrip("/")
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def unmount_below(path: Path) -> None:
    for point in reversed(mounts_below(path)):
        subprocess.run(["umount", "--lazy", point], check=False)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Pod:
    """A working container of the image, run as the Job's pod runs: as UID 10001 with the image's environment,
    no network but loopback, every directory of the image read-only (readOnlyRootFilesystem), and writable
    only the given mounts (container path -> host folder)."""

    container: str
    rootfs: Path
    writable: dict[str, Path]

    def run(self, *argv: str, env: Mapping[str, str] | None = None, read_only: bool = True,
            timeout: float = 600) -> Result:
        for path in RUNTIME_MOUNTPOINTS:
            (self.rootfs / path).touch(exist_ok=True)
        options = ["--isolation", "chroot", "--user", POD_USER]
        if read_only:
            # buildah has no --read-only: each top-level folder of the image is bound read-only onto itself;
            # / itself is root's and not writable to 10001. /dev, /proc and /sys are the runtime's.
            tops = {target.strip("/").split("/")[0] for target in self.writable}
            for entry in sorted(self.rootfs.iterdir()):
                if entry.is_dir() and not entry.is_symlink() and entry.name not in {"dev", "proc", "sys", *tops}:
                    options += ["--volume", f"{entry}:/{entry.name}:ro"]
        for target, host in self.writable.items():
            options += ["--volume", f"{host}:{target}"]
        for key, value in (env or {}).items():
            options += ["--env", f"{key}={value}"]
        # chroot isolation shares the host's network; a namespace of its own leaves only loopback.
        argv_ = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                 *buildah_argv("run", *options, self.container, "--", *argv)]
        proc = subprocess.Popen(argv_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = communicate(proc, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{list(argv)} ran over {timeout:.0f} s") from None
        return Result(proc.returncode, stdout, stderr)


@contextmanager
def pod(image: str, writable: dict[str, Path]) -> Iterator[Pod]:
    """A working container for the duration; removed afterwards, with its mounts."""
    container = buildah("from", "--pull=never", image)
    try:
        yield Pod(container, Path(buildah("mount", container)), writable)
    finally:
        try:
            buildah("umount", container)
        finally:
            buildah("rm", container)


def leftovers() -> list[str]:
    """What the tests' store holds besides images: working containers (names) and mounts (paths)."""
    containers = buildah("containers", "--format", "{{.ContainerName}}").split()
    return containers + mounts_below(STORE)
