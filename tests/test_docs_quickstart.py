"""The quickstart (README, and the same commands in the guide) is a script a new user runs as it stands: its shell is
valid, every gcloud command uses only reviewed flags, and every name in it is the one the project uses (the machine
type and accelerator an overlay is sized for, the node label components/gpu selects, the registry path the tasks
build, the Filestore tier components/filestore argues for, the MLflow service the examples point at)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import yaml
from helpers import REPO

from k8s_tasks.image import IMAGE_NAME, repository
from k8s_tasks.sizing import CPU_MACHINE, SHAPES, training_machines
from k8s_tasks.ui import in_cluster_service

README = REPO / "README.md"
GUIDE = REPO / "docs" / "PRZEWODNIK-UZYCIA.md"
SECTIONS = {README: "### Quickstart: from an empty GCP project to a training Job",
            GUIDE: "## 10. Szybki start: od pustego projektu GCP do treningu"}
ENV = "gpu"  # the overlay the quickstart sets up
# The flags each gcloud command may take here, from the gcloud reference (cloud.google.com/sdk/gcloud/reference:
# container clusters create, container node-pools create, artifacts repositories ..., filestore instances ...).
GCLOUD_FLAGS = {
    ("components", "install"): set(),
    ("config", "set"): set(),
    ("services", "enable"): set(),
    ("projects", "describe"): {"--format"},
    ("auth", "configure-docker"): set(),
    ("artifacts", "repositories", "create"): {"--repository-format", "--location"},
    ("artifacts", "repositories", "add-iam-policy-binding"): {"--location", "--member", "--role"},
    ("container", "clusters", "create"): {"--location", "--release-channel", "--enable-dataplane-v2",
                                          "--enable-ip-alias", "--addons", "--machine-type", "--num-nodes"},
    ("container", "clusters", "get-credentials"): {"--location"},
    ("container", "node-pools", "create"): {"--cluster", "--location", "--machine-type", "--accelerator",
                                            "--node-labels", "--disk-size", "--num-nodes", "--enable-autoscaling",
                                            "--min-nodes", "--max-nodes", "--spot"},
    ("filestore", "instances", "create"): {"--zone", "--tier", "--file-share", "--network"},
    ("filestore", "instances", "describe"): {"--zone", "--format"},
}
FENCE = re.compile(r"^```bash\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@cache
def block(doc: Path) -> str:
    """The first bash block of the doc's quickstart section."""
    text = doc.read_text(encoding="utf-8")
    heading = SECTIONS[doc]
    assert heading in text, f"{doc.name} has no section {heading!r}"
    match = FENCE.search(text, text.index(heading))
    assert match is not None, f"{doc.name}: no bash block in {heading!r}"
    return match.group(1)


def commands(doc: Path) -> list[str]:
    """The block's commands: comments dropped, continuation lines joined."""
    joined = block(doc).replace("\\\n", " ")
    lines = [line.split(" # ")[0].strip() for line in joined.splitlines()]
    return [" ".join(line.split()) for line in lines if line and not line.startswith("#")]


def gcloud_calls(doc: Path) -> list[tuple[tuple[str, ...], list[str]]]:
    """(command group path, its arguments) of every gcloud call, those inside $(...) included."""
    calls = []
    for command in commands(doc):
        if "$(" in command:  # NAME=$(gcloud ...): the command substituted
            command = command[command.index("$(") + 2:command.rindex(")")]
        if command.startswith("gcloud "):
            words = shlex.split(command)[1:]
            call = " ".join(words)
            group = max((g for g in GCLOUD_FLAGS if tuple(words[:len(g)]) == g), key=len, default=None)
            assert group is not None, f"{doc.name}: gcloud {call}: not a reviewed command"
            calls.append((group, words[len(group):]))
    return calls


def flags(arguments: list[str]) -> dict[str, str]:
    return dict((a.split("=", 1) + [""])[:2] for a in arguments if a.startswith("--"))


def call(doc: Path, group: tuple[str, ...]) -> dict[str, str]:
    (found,) = [flags(arguments) for g, arguments in gcloud_calls(doc) if g == group]
    return found


def test_the_quickstart_is_valid_shell() -> None:
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the quickstart"
    for doc in SECTIONS:
        result = subprocess.run([bash, "-n"], input=block(doc), capture_output=True, text=True, timeout=30,
                                check=False)
        assert result.returncode == 0, f"{doc.name}: {result.stderr}"


def test_the_guide_runs_the_readmes_commands() -> None:
    assert commands(GUIDE) == commands(README)
    assert len(commands(README)) >= 20


def test_every_gcloud_command_uses_only_reviewed_flags() -> None:
    for doc in SECTIONS:
        for group, arguments in gcloud_calls(doc):
            unknown = set(flags(arguments)) - GCLOUD_FLAGS[group]
            assert not unknown, f"{doc.name}: gcloud {' '.join(group)}: {sorted(unknown)}"


def test_the_gpu_pool_is_the_overlays_machine_with_the_label_the_manifests_select() -> None:
    pool = call(README, ("container", "node-pools", "create"))
    shape = SHAPES[training_machines(ENV)[0]]
    assert pool["--machine-type"] == shape.name
    assert pool["--accelerator"] == f"type={shape.gpu},count={shape.gpus},gpu-driver-version=default"
    patch = yaml.safe_load((REPO / "components" / "gpu" / "patches" / "job-train.gpu.yaml").read_text())
    selector = patch["spec"]["template"]["spec"]["nodeSelector"]
    assert pool["--node-labels"] == ",".join(f"{k}={v}" for k, v in selector.items()) == "nvidia.com/gpu=true"
    assert pool["--min-nodes"] == "0"  # it costs nothing while no Job runs


def test_the_cluster_enforces_network_policies_and_has_a_cpu_pool_for_the_merge() -> None:
    cluster = call(README, ("container", "clusters", "create"))
    assert "--enable-dataplane-v2" in cluster
    assert "GcpFilestoreCsiDriver" in cluster["--addons"].split(",")
    assert cluster["--machine-type"] == CPU_MACHINE and not SHAPES[CPU_MACHINE].gpus


def test_the_registry_is_the_one_the_tasks_push_to_and_the_nodes_may_read() -> None:
    (export,) = [c for c in commands(README) if c.startswith("export PROJECT_ID=")]
    values = dict(word.split("=", 1) for word in shlex.split(export)[1:])
    image = repository(values)
    assert image == f"{values['REGION']}-docker.pkg.dev/{values['PROJECT_ID']}/{values['REPOSITORY']}/{IMAGE_NAME}"
    binding = call(README, ("artifacts", "repositories", "add-iam-policy-binding"))
    assert binding["--role"] == "roles/artifactregistry.reader"
    assert binding["--member"] == "serviceAccount:$PROJECT_NUMBER-compute@developer.gserviceaccount.com"
    assert "gcloud auth configure-docker $REGION-docker.pkg.dev" in commands(README)


def test_the_storage_is_the_filestore_tier_the_component_argues_for() -> None:
    filestore = call(README, ("filestore", "instances", "create"))
    assert filestore["--tier"] == "BASIC_HDD"
    capacity = dict(part.split("=") for part in filestore["--file-share"].split(","))["capacity"]
    assert capacity == "1TB"  # Basic HDD's minimum (components/filestore/patches/...)
    claim = (REPO / "components" / "filestore" / "patches" / "persistentvolumeclaim.filestore.yaml").read_text()
    assert "Basic HDD" in claim and "storageClassName: standard-rwx" in claim
    for path in ("overlays/gpu/patches/persistentvolume.nfs-server.yaml", "overlays/gpu/mlflow.env.example"):
        assert path in block(README) and (REPO / path).is_file(), path


def test_mlflow_is_installed_where_the_example_configuration_points() -> None:
    (install,) = [shlex.split(c) for c in commands(README) if c.startswith("helm install ")]
    release, namespace = install[2], install[install.index("--namespace") + 1]
    example = (REPO / "overlays" / ENV / "mlflow.env.example").read_text()
    uri = re.search(r"^MLFLOW_TRACKING_URI=(\S+)$", example, re.MULTILINE).group(1)
    assert in_cluster_service(uri) == (namespace, release, 5000)


def test_the_quickstart_ends_with_doctor_deploy_storage_and_training() -> None:
    tasks = [c for c in commands(README) if c.startswith("invoke ")]
    assert tasks == ["invoke build push", f"invoke doctor --env={ENV} --no-probe",
                     f"invoke deploy --env={ENV} --mlflow-env ~/mlflow-gpu.env", f"invoke prepare-storage --env={ENV}",
                     f"invoke doctor --env={ENV}", f"invoke train --env={ENV} --dry-run",
                     f"invoke train --env={ENV} --follow"]


def test_every_command_is_a_tool_the_quickstart_installs_or_names() -> None:
    tools = {"gcloud", "pip", "export", "helm", "invoke", "cp"}
    for command in commands(README):
        first = command.split()[0]
        assert first in tools or re.fullmatch(r"[A-Z_]+=\$\(gcloud .*\)", command), command
    assert len(gcloud_calls(README)) == sum("gcloud " in c for c in commands(README))
