"""`python -m entrypoint merge`: merge the finished adapter into the base and publish it for vLLM.

The steps, in the order `run` calls them:
- inputs: training's completion marker (waited for when asked) and the identity of what would be published
  (merge_inputs.py); when the published version already carries it, there is nothing to do, and nothing
  heavy was imported;
- lock: one publisher per MERGED_MODEL_PATH; work left by a killed merge is removed;
- merge: stream base + adapter into a temporary directory (lora_merge.py), after checking free space and
  that the merge, and the gate's model-running checks, fit this container's memory limit (headroom.py);
- verify: the result has the base's tensors, a tokenizer and stop ids that exist, read from headers and
  JSON alone (verify.py);
- gate: the model works as trained (gate.py: finite, the adapter had an effect, template and stop tokens,
  greedy probes equal to base + adapter); PUBLISH_GATE=strict refuses to publish on a failed check;
- lineage: lineage.json and a README.md model card in the version (lineage.py);
- publish: a new version directory and an atomic switch of the symlink vLLM reads (publish.py);
  old versions beyond MERGE_KEEP_VERSIONS are removed;
- record: merge figures, the gate's report and the dataset (an MLflow dataset input) on the training's MLflow
  run, and a registry version with the alias `candidate` (and `champion` when it passed the gate) when
  asked. MLflow trouble is never fatal to a merge: it is logged, and the model is published all the same.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

from entrypoint.errors import EntrypointError, ExitCode, TemporaryFailure, finish
from entrypoint.files import read_json
from entrypoint.gate import REPORT, GateRefused
from entrypoint.lineage import CARD, LINEAGE, log_dataset_input
from entrypoint.merge_inputs import MergeInputs, read_inputs, wait_for_adapter
from entrypoint.publish import Published, check_free_space, cleanup_on_failure, directory_bytes
from entrypoint.settings import Settings
from entrypoint.storage import OutputLock, lock_path_for, owner_id
from entrypoint.tracking import Tracker, preflight

log = logging.getLogger("entrypoint")

MIB = 1024 * 1024


def run(settings: Settings) -> int:
    t0 = time.monotonic()
    inputs = read_inputs(settings, wait_for_adapter(settings))
    published = Published.at(Path(settings.merged_model_path))
    lock = OutputLock(lock_path_for(published.path), ttl=settings.lock_ttl_seconds, owner=owner_id(settings.pod_name))
    if published.serves(inputs.fingerprint):
        tidy_if_free(published, lock, settings.merge_keep_versions)
        hand_off_if_asked(settings, inputs, published.current())  # type: ignore[arg-type]
        return finish(ExitCode.OK, f"skipped: {published.path} already serves this adapter "
                      f"({published.current().name})")  # type: ignore[union-attr]

    rolled_back = published.rollbacks().get(inputs.fingerprint)
    if rolled_back:
        return finish(ExitCode.OK, f"skipped: this adapter was published as {rolled_back['version']} and rolled back "
                      f"to {rolled_back['rolled_back_to']}; {published.path} keeps serving what the rollback chose. "
                      f"To serve it again: python -m entrypoint rollback --to {rolled_back['version'][:5]} (or train "
                      "a new adapter)")
    tracking = tracking_available(settings, inputs)
    with lock.held(settings.lock_wait_seconds):
        if published.serves(inputs.fingerprint):
            tidy(published, settings.merge_keep_versions)
            return finish(ExitCode.OK, f"skipped: {published.path} already serves this adapter")
        tidy(published, settings.merge_keep_versions)
        try:
            version, result = merge_and_publish(settings, inputs, published)
        except GateRefused as refused:
            if tracking:
                record_refusal(settings, inputs, refused)
            raise
        prune(published, settings.merge_keep_versions)
    wall = time.monotonic() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("published %s: %.1f MiB %s, %d tensors merged, %.1fs, peak RSS %.0f MiB", version.name,
             result.output_bytes / MIB, result.dtype, result.tensors_merged, wall, peak_mib)
    if tracking:
        record(settings, inputs, published, version, result, wall, peak_mib)
    hand_off_if_asked(settings, inputs, version)
    return finish(ExitCode.OK, f"published: {published.path} -> {version.name}")


def hand_off_if_asked(settings: Settings, inputs: MergeInputs, version: Path) -> None:
    """With VLLM_URL: the running vLLM gets the adapter of the served version (handoff.py)."""
    if settings.vllm_url:
        from entrypoint.handoff import hand_off

        hand_off(settings.vllm_url, settings.vllm_api_key, settings.served_model_name, version.name,
                 None if inputs.full else inputs.adapter, settings.merged_model_path)


def tracking_available(settings: Settings, inputs: MergeInputs) -> bool:
    """Whether the merge can be recorded on the training's MLflow run; a server in trouble only costs the record."""
    if settings.tracking != "mlflow" or not inputs.mlflow_run_id:
        return False
    try:
        preflight(settings.mlflow_tracking_uri, settings.mlflow_experiment_name, settings.mlflow_timeout_seconds)
    except EntrypointError as exc:
        log.warning("MLflow: %s; merging without recording the merge on run %s", exc, inputs.mlflow_run_id)
        return False
    return True


def tidy(published: Published, keep: int) -> None:
    """Under the lock: remove what killed merges left and versions beyond MERGE_KEEP_VERSIONS, move an older
    plain directory into the scheme."""
    for stale in published.remove_stale_workdirs():
        log.warning("removed unfinished work of an interrupted merge: %s", stale)
    if published.is_legacy_directory():
        moved = published.migrate_legacy()
        log.warning("MERGED_MODEL_PATH was a plain directory (older layout): kept as %s, now a symlink", moved)
    prune(published, keep)


def prune(published: Published, keep: int) -> None:
    for old in published.prune(keep):
        log.info("removed old version %s (MERGE_KEEP_VERSIONS=%d)", old.name, keep)


def tidy_if_free(published: Published, lock: OutputLock, keep: int) -> None:
    """A merge with nothing to publish still tidies what a killed one left (and an expired lock), unless
    another merge holds the lock right now: then that one tidies."""
    try:
        lock.acquire(0)
    except TemporaryFailure:
        return
    try:
        tidy(published, keep)
    finally:
        lock.release()


def merge_and_publish(settings: Settings, inputs: MergeInputs, published: Published):
    from entrypoint.gate import check_memory_before_merging, gate_merge
    from entrypoint.lineage import build_lineage, dataset_statistics, summary, write_lineage
    from entrypoint.lora_merge import check_memory, merge_adapter, prepare_merge  # torch loads here, once needed
    from entrypoint.progress import ShardProgress
    from entrypoint.verify import verify_merged

    source = inputs.adapter if inputs.full else inputs.base
    prepared = prepare_merge(source, None if inputs.full else inputs.adapter)  # refusals before any write
    needed = directory_bytes(source) if inputs.full else sum(
        p.stat().st_size for p in source.iterdir() if p.is_file() and not p.name.endswith((".bin", ".pt")))
    check_free_space(published.versions, needed)
    check_memory(prepared)
    check_memory_before_merging(settings, prepared, None if inputs.full else inputs.adapter)
    workdir = published.new_workdir()
    with cleanup_on_failure(workdir):
        result = merge_adapter(prepared, None, workdir, ShardProgress(), stop_tokens=inputs.stop_tokens)
        verify_merged(workdir, prepared.base, result.untied)
        gate = gate_merge(settings, inputs, prepared, workdir, published)
        manifest = {
            "inputs": inputs.identity,
            "adapter_path": str(inputs.adapter),
            "base_model_path": str(inputs.base),
            "mlflow_run_id": inputs.mlflow_run_id,
            "published_at": time.time(),
            "dtype": result.dtype,
            "bytes": result.output_bytes,
            "tensors_merged": result.tensors_merged,
            "template": inputs.marker.get("template"),
            "gate": None if gate is None else {"mode": gate.mode, "passed": gate.passed,
                                               "failed": [c.name for c in gate.failed]},
        }
        lineage = build_lineage(settings, inputs, f"v{published.next_number():04d}", result,
                                summary(gate.as_dict()) if gate else None,
                                inputs.marker.get("data_statistics") or dataset_statistics(settings))
        write_lineage(workdir, lineage)
        version = published.publish(workdir, inputs.fingerprint, manifest)
    return version, result


def record(settings: Settings, inputs: MergeInputs, published: Published, version: Path, result, wall: float,
           peak_mib: float) -> None:
    """Merge facts on the training run; a model version in the registry when a name is configured.
    MLflow trouble here is logged, never fatal: the model is already published."""
    tracker = Tracker(settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds)
    tracker.attach(inputs.mlflow_run_id)  # type: ignore[arg-type]
    tracker.log_metrics({"merge_wall_seconds": wall, "merge_peak_rss_mib": peak_mib,
                         "merged_model_bytes": float(result.output_bytes)}, step=0)
    tracker.set_tags({"merged_model_path": str(published.path), "merged_model_version": version.name,
                      "merged_model_dir": str(version), "merged_model_dtype": result.dtype})
    record_gate(tracker, version / REPORT)
    for name in (LINEAGE, CARD):
        tracker.log_artifact(version / name)
    try:
        log_dataset_input(tracker, read_json(version / LINEAGE) or {})
        if settings.registered_model_name:
            number = tracker.register_version(settings.registered_model_name, version, published.path)
            gate = (published.manifest(version) or {}).get("gate") or {}
            aliases = ["candidate", *(["champion"] if gate.get("passed") else [])]
            for alias in aliases:
                tracker.client.set_registered_model_alias(settings.registered_model_name, alias, number)
            log.info("MLflow: %s version %s has the aliases %s", settings.registered_model_name, number,
                     ", ".join(aliases))
    except Exception as exc:
        log.warning("MLflow: could not register the merge of run %s: %s", inputs.mlflow_run_id, exc)
    finally:
        tracker.close(None, timeout=30)


def record_gate(tracker: Tracker, report_path: Path) -> None:
    """The gate's report as an artifact of the training run, its outcome as metrics and a tag."""
    report = read_json(report_path)
    if report is None:
        return
    metrics = {"gate_passed": float(report["passed"]), "gate_seconds": report["seconds"],
               "gate_peak_rss_mib": report["peak_rss_mib"]}
    for check in report["checks"]:
        if check["name"] == "eval_loss":
            data = check["data"]
            values = {"gate_eval_loss": data.get("loss"), "gate_base_eval_loss": data.get("base_loss")}
            metrics.update({k: v for k, v in values.items() if v is not None})
    tracker.log_metrics(metrics, step=0)
    tracker.set_tags({"gate_result": "passed" if report["passed"] else "failed: " + ", ".join(
        c["name"] for c in report["checks"] if c["status"] == "fail")})
    tracker.log_artifact(report_path)


def record_refusal(settings: Settings, inputs: MergeInputs, refused: GateRefused) -> None:
    """A refused merge on the training's run: the report and why; MLflow trouble is logged, never fatal."""
    try:
        tracker = Tracker(settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds)
        tracker.attach(inputs.mlflow_run_id)  # type: ignore[arg-type]
        record_gate(tracker, refused.path)
        tracker.close(None, timeout=30)
    except Exception as exc:
        log.warning("MLflow: could not record the gate's refusal on run %s: %s", inputs.mlflow_run_id, exc)
