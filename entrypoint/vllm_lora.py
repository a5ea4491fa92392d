"""`python -m entrypoint vllm-lora`, the alternative to merging: let vLLM serve the LoRA adapter itself.

vLLM applies one scale (lora_alpha / r, or / sqrt(r) with rsLoRA) to every module and serves LoRA
on linear layers only, so only some adapters come out of it the same as a merge would. Torch-free:
this runs wherever the deploy tooling runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from entrypoint.errors import ConfigError
from entrypoint.lora_inputs import parse_adapter_key, read_adapter
from entrypoint.model_dir import EMBEDDING_MODULES, added_tokens, read_base_model
from entrypoint.settings import NAME_RE, Settings

# vLLM's LoRAConfig accepts these max_lora_rank values; an adapter's rank must not exceed the one set.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_max_rank(adapter_dir: Path) -> int:
    config, _ = read_adapter(adapter_dir)
    return max([config.r, *(int(r) for r in config.rank_pattern.values())])


def check_vllm_lora(adapter_dir: Path, base_dir: Path) -> list[str]:
    """Why vLLM could not serve this adapter on this base as is; empty when it can."""
    try:
        config, header = read_adapter(adapter_dir)
        base = read_base_model(base_dir)
    except ConfigError as exc:
        return [str(exc)]
    raw = config.raw
    problems = []
    if raw.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {raw.get('peft_type')!r}: vLLM serves LoRA adapters only")
    if raw.get("use_dora"):
        problems.append("DoRA adapters (use_dora) are not supported by vLLM")
    rank = adapter_max_rank(adapter_dir)
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")
    if config.rank_pattern or config.alpha_pattern:
        problems.append("rank_pattern/alpha_pattern are set: vLLM scales every module by lora_alpha / r, "
                        "so modules with their own rank or alpha would be scaled wrongly")
    if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
        problems.append("the adapter trains biases (bias != none or lora_bias): vLLM ignores or refuses them")
    if config.modules_to_save:
        trained = list(config.modules_to_save)
        problems.append(f"modules_to_save is {trained}: vLLM refuses adapters with fully trained modules")
    extra = added_tokens(adapter_dir, base_dir)
    if extra:
        problems.append(f"the adapter's tokenizer adds {len(extra)} tokens (e.g. {extra[0]!r}): vLLM serves "
                        "the base vocabulary only")
    for key in (entry.name for entry in header.entries):
        parsed = parse_adapter_key(key)
        leaf = parsed.module.rsplit(".", 1)[-1]
        if parsed.kind in ("lora_A", "lora_B") and leaf not in EMBEDDING_MODULES:
            target = base.resolve(f"{parsed.module}.weight")
            if target is None or len(base.tensors[target][1].shape) != 2:
                problems.append(f"adapter tensor {key} matches no linear layer of the base model")
        elif parsed.kind != "lora_B.bias":
            problems.append(f"adapter tensor {key} is not LoRA on a linear layer; vLLM serves only those")
    return list(dict.fromkeys(problems))


@dataclasses.dataclass(frozen=True)
class VllmLoraInstructions:
    """How to serve an adapter with vLLM: at start-up, or loaded into a running server."""

    serve_args: tuple[str, ...]  # added to `vllm serve <base model>`
    runtime_env: dict[str, str]  # the server's environment, for loading adapters at runtime
    load_method: str
    load_path: str
    load_body: dict[str, str]

    def text(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.runtime_env.items())
        return "\n".join([
            "At start-up: vllm serve <base model> " + " ".join(self.serve_args),
            f"At runtime, on a server started with {env} and --enable-lora:",
            f"  curl -X {self.load_method} http://<vllm>{self.load_path} -H 'Content-Type: application/json' "
            f"-d '{json.dumps(self.load_body)}'",
        ])


def vllm_lora_instructions(
    adapter_dir: Path, name: str, max_lora_rank: int | None = None
) -> VllmLoraInstructions:
    """vLLM flags and the runtime load request; max_lora_rank defaults to the smallest that fits."""
    if not NAME_RE.match(name):
        raise ConfigError(f"LoRA name {name!r} is not valid: use letters, digits, '.', '_' or '-'")
    rank = adapter_max_rank(adapter_dir)
    if max_lora_rank is None:
        fitting = [allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank]
        if not fitting:
            raise ConfigError(f"adapter rank {rank} exceeds vLLM's largest max_lora_rank (512)")
        max_lora_rank = fitting[0]
    elif max_lora_rank not in VLLM_MAX_LORA_RANKS or max_lora_rank < rank:
        raise ConfigError(
            f"max_lora_rank {max_lora_rank} is not valid for an adapter of rank {rank}: expected one of "
            f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}, at least {rank}"
        )
    path = str(adapter_dir)
    return VllmLoraInstructions(
        serve_args=("--enable-lora", "--lora-modules", f"{name}={path}",
                    "--max-lora-rank", str(max_lora_rank)),
        runtime_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        load_method="POST",
        load_path="/v1/load_lora_adapter",
        load_body={"lora_name": name, "lora_path": path},
    )


def run(settings: Settings) -> int:
    """Can vLLM serve the adapter without a merge, and how: the flags and the runtime load request."""
    from entrypoint.merge_inputs import wait_for_adapter

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
