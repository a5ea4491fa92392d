"""`python -m entrypoint merge`: merge the finished adapter into the base and publish it for vLLM.

Fast path first (no heavy import): the adapter's completion marker plus the base model's identity
give the merge fingerprint; when the published version already carries it, there is nothing to do.
Otherwise: lock, check free space, stream the merge into a temporary directory, check the result
loads, publish atomically (publish.py), prune old versions, record it in MLflow.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError, ExitCode, TemporaryFailure, finish
from entrypoint.fingerprint import digest
from entrypoint.plan import model_identity
from entrypoint.publish import Published, check_free_space, cleanup_on_failure, directory_bytes
from entrypoint.settings import Settings
from entrypoint.storage import OutputLock, lock_path_for, read_marker
from entrypoint.tracking import preflight

log = logging.getLogger("entrypoint")

ENGINE = "stream-merge-1"  # part of the fingerprint: a changed merge algorithm publishes anew
WAIT_POLL_SECONDS = 10.0


def wait_for_adapter(settings: Settings) -> dict[str, Any]:
    """The training marker, waiting for it up to ADAPTER_WAIT_SECONDS when configured."""
    adapter = Path(settings.lora_output_path)
    deadline = time.monotonic() + settings.adapter_wait_seconds
    announced = False
    while True:
        marker = read_marker(adapter)
        if marker is not None:
            return marker
        if time.monotonic() >= deadline:
            break
        if not announced:
            log.info("waiting up to %ds for training to complete %s", settings.adapter_wait_seconds, adapter)
            announced = True
        time.sleep(min(WAIT_POLL_SECONDS, max(0.1, deadline - time.monotonic())))
    what = "does not exist" if not adapter.exists() else "has no completion marker (training is unfinished)"
    if settings.adapter_wait_seconds:
        raise TemporaryFailure(f"LORA_OUTPUT_PATH={str(adapter)!r} {what} after waiting "
                               f"{settings.adapter_wait_seconds}s (ADAPTER_WAIT_SECONDS)")
    raise ConfigError(f"LORA_OUTPUT_PATH={str(adapter)!r} {what}: train first (python -m entrypoint train), "
                      "or set ADAPTER_WAIT_SECONDS to wait for a running training")


def merge_fingerprint(settings: Settings, marker: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    inputs = {
        "engine": ENGINE,
        "training": marker.get("fingerprint"),
        "finetuning_type": marker.get("finetuning_type"),
        "base": model_identity(Path(settings.base_model_path)) if marker.get("finetuning_type") != "full" else {},
    }
    return digest(inputs), inputs


def run(settings: Settings) -> int:
    t0 = time.monotonic()
    marker = wait_for_adapter(settings)
    base_dir = Path(settings.base_model_path)
    if marker.get("finetuning_type") != "full" and not (base_dir / "config.json").is_file():
        raise ConfigError(f"BASE_MODEL_PATH={str(base_dir)!r} has no config.json: expected the model the adapter "
                          "was trained on")
    fingerprint, inputs = merge_fingerprint(settings, marker)
    published = Published.at(Path(settings.merged_model_path))
    current = published.current()
    if (published.manifest(current) or {}).get("fingerprint") == fingerprint:
        return finish(ExitCode.OK, f"skipped: {published.path} already serves this adapter ({current.name})")

    tracking = settings.tracking == "mlflow" and bool(marker.get("mlflow_run_id"))
    if tracking:
        preflight(settings.mlflow_tracking_uri, settings.mlflow_experiment_name, settings.mlflow_timeout_seconds)

    lock = OutputLock(lock_path_for(published.path), ttl=settings.lock_ttl_seconds)
    with lock.held(settings.lock_wait_seconds):
        current = published.current()
        if (published.manifest(current) or {}).get("fingerprint") == fingerprint:
            return finish(ExitCode.OK, f"skipped: {published.path} already serves this adapter")
        for stale in published.remove_stale_workdirs():
            log.warning("removed unfinished work of an interrupted merge: %s", stale)
        if published.is_legacy_directory():
            moved = published.migrate_legacy()
            log.warning("MERGED_MODEL_PATH was a plain directory (older layout): kept as %s, now a symlink", moved)
        return _merge_locked(settings, marker, fingerprint, inputs, published, t0, tracking)


def _progress_printer():
    """A bar per shard in a terminal, one log line per shard otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar: dict[str, Any] = {}

        def show(p) -> None:
            if "bar" not in bar:
                bar["bar"] = tqdm(total=p.shard_count, unit="shard", desc="merge", file=sys.stderr)
            bar["bar"].set_postfix_str(p.shard_name)
            bar["bar"].update(1)
            if p.shard_index == p.shard_count:
                bar["bar"].close()

        return show

    def log_line(p) -> None:
        log.info("merged shard %d/%d %s (%.0f%% of the weights)", p.shard_index, p.shard_count, p.shard_name,
                 100.0 * p.bytes_done / max(1, p.bytes_total))

    return log_line


def _merge_locked(settings: Settings, marker: dict[str, Any], fingerprint: str, inputs: dict[str, Any],
                  published: Published, t0: float, tracking: bool) -> int:
    from entrypoint.lora_merge import merge_adapter  # torch loads here, once there is work to do

    full = marker.get("finetuning_type") == "full"
    adapter = Path(settings.lora_output_path)
    source = adapter if full else Path(settings.base_model_path)
    needed = directory_bytes(source) if full else sum(
        p.stat().st_size for p in source.iterdir() if p.is_file() and not p.name.endswith((".bin", ".pt")))
    check_free_space(published.versions, needed)
    workdir = published.new_workdir()
    with cleanup_on_failure(workdir):
        try:
            result = merge_adapter(source, None if full else adapter, workdir, _progress_printer())
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC: someone else filled the disk meanwhile
                raise ConfigError(f"no space left on {published.versions} while writing the merged model") from exc
            raise
        verify_loadable(workdir, Path(settings.base_model_path) if not full else adapter)
        manifest = {
            "inputs": inputs,
            "adapter_path": str(adapter),
            "base_model_path": settings.base_model_path,
            "mlflow_run_id": marker.get("mlflow_run_id"),
            "published_at": time.time(),
            "dtype": result.dtype,
            "bytes": result.output_bytes,
            "tensors_merged": result.tensors_merged,
        }
        version = published.publish(workdir, fingerprint, manifest)
    for old in published.prune(settings.merge_keep_versions):
        log.info("removed old version %s (MERGE_KEEP_VERSIONS=%d)", old.name, settings.merge_keep_versions)
    wall = time.monotonic() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("published %s: %.1f MB %s, %d tensors merged, %.1fs, peak RSS %.0f MB", version.name,
             result.output_bytes / 1e6, result.dtype, result.tensors_merged, wall, peak_mb)
    if tracking:
        _record(settings, marker["mlflow_run_id"], published, version, result, wall, peak_mb)
    return finish(ExitCode.OK, f"published: {published.path} -> {version.name}")


def verify_loadable(model_dir: Path, reference_dir: Path) -> None:
    """Check the result as transformers will load it, without materialising the weights: the config and
    tokenizer load, every parameter of the architecture is present with its shape, special tokens are
    the reference's (a changed EOS makes vLLM never stop generating)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    found: dict[str, tuple[int, ...]] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                found[name] = tuple(fh.get_slice(name).get_shape())
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [n for n in expected if n not in found and not (tied and n.endswith("lm_head.weight"))]
    wrong = [n for n, shape in expected.items() if n in found and found[n] != shape]
    if missing or wrong:
        raise ConfigError(f"the merged model does not match its architecture: missing {missing[:5]}, "
                          f"wrong shape {wrong[:5]}; nothing was published")
    if any(reference_dir.glob("tokenizer*")):
        ours, theirs = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(reference_dir)
        for attr in ("eos_token", "bos_token", "pad_token"):
            if getattr(ours, attr) != getattr(theirs, attr):
                raise ConfigError(f"the merged model's {attr} is {getattr(ours, attr)!r}, the base's is "
                                  f"{getattr(theirs, attr)!r}; nothing was published")


def _record(settings: Settings, run_id: str, published: Published, version: Path, result: Any, wall: float,
            peak_mb: float) -> None:
    """Merge facts on the training run; a model version in the registry when a name is configured.
    MLflow trouble here is logged, never fatal: the model is already published."""
    from entrypoint.tracking import Tracker

    tracker = Tracker(settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds)
    try:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        tracker.client.log_batch(run_id, metrics=[
            Metric("merge_wall_seconds", wall, now, 0),
            Metric("merge_peak_rss_mb", peak_mb, now, 0),
            Metric("merged_model_bytes", float(result.output_bytes), now, 0),
        ], tags=[
            RunTag("merged_model_path", str(published.path)),
            RunTag("merged_model_version", version.name),
            RunTag("merged_model_dir", str(version)),
            RunTag("merged_model_dtype", result.dtype),
        ])
        if settings.registered_model_name:
            register(tracker, run_id, settings.registered_model_name, version, published.path)
    except Exception as exc:
        log.warning("MLflow: could not record the merge on run %s: %s", run_id, exc)


def register(tracker: Any, run_id: str, name: str, version: Path, served_path: Path) -> str:
    """A registry version whose source the server accepts: a small artifact on the training run (the
    version's manifest and config), with the NFS path as a tag; the weights stay on the storage."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    artifact_path = f"merged-model/{version.name}"
    for small in (version / ".merge.json", version / "config.json", version / "generation_config.json"):
        if small.is_file():
            client.log_artifact(run_id, str(small), artifact_path)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code if hasattr(exc, "error_code") else exc):
            raise
    model_version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
        tags={"storage_path": str(version), "served_path": str(served_path)},
        description=f"Merged model on NFS: {version}",
    )
    log.info("MLflow: registered %s version %s", name, model_version.version)
    return str(model_version.version)


def vllm_lora(settings: Settings) -> int:
    """`python -m entrypoint vllm-lora`: can vLLM serve the adapter without a merge, and how."""
    from entrypoint.vllm_lora import check_vllm_lora, vllm_lora_instructions

    wait_for_adapter(settings)
    adapter = Path(settings.lora_output_path)
    problems = check_vllm_lora(adapter, Path(settings.base_model_path))
    if problems:
        raise ConfigError("vLLM cannot serve this adapter as is: " + "; ".join(problems) + ". Merge it instead "
                          "(python -m entrypoint merge)")
    instructions = vllm_lora_instructions(adapter, settings.served_model_name)
    print(instructions.text())
    print(json.dumps({"lora_name": settings.served_model_name, "lora_path": str(adapter)}))
    return 0
