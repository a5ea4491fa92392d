"""The streaming LoRA merge against the real thing: PEFT's merge_and_unload on the same base, and the
trained function itself (PEFT's unmerged forward pass) where merge_and_unload is known to differ from it.

Every model, tokenizer and adapter is generated here (tests/merge_helpers.py); nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from merge_helpers import (
    directory_bytes,
    load_model,
    make_adapter,
    make_base,
    make_tokenizer,
    max_ulp,
    model_config,
    peft_merged,
    peft_unmerged,
    read_json,
    read_weights,
)
from safetensors.torch import load_file, save_file

from entrypoint.errors import ConfigError, ExitCode
from entrypoint.lora_merge import ADD_CHUNK, MergeProgress, _add_into, _Scratch, merge_adapter
from entrypoint.vllm_lora import check_vllm_lora, vllm_lora_instructions

REPO = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"
LINEAR = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
          "up_proj.weight", "down_proj.weight")


def merged(base: Path, adapter: Path | None, out: Path, progress=None):
    out.mkdir()
    return merge_adapter(base, adapter, out, progress)


# (architecture, dtype, LoRA options, the base tensors the adapter must change)
CASES = {
    "llama-fp32-all-linear": ("llama", torch.float32, {"target_modules": "all-linear"}, LINEAR),
    "llama-bf16-subset-rslora": ("llama", torch.bfloat16,
                                 {"target_modules": ["q_proj", "v_proj"], "use_rslora": True},
                                 ("q_proj.weight", "v_proj.weight")),
    "llama-fp16-rank-and-alpha-patterns": ("llama", torch.float16, {
        "target_modules": "all-linear",
        "rank_pattern": {"layers.1.self_attn.q_proj": 4, "down_proj": 2},
        "alpha_pattern": {r"layers\.0\..*": 7},
    }, LINEAR),
    "qwen2-fp16-biases-untouched": ("qwen2", torch.float16, {"target_modules": "all-linear"}, LINEAR),
    "qwen2-bf16-bias-all-and-lora-bias": ("qwen2", torch.bfloat16, {
        "target_modules": ["q_proj", "k_proj", "v_proj"], "bias": "all", "lora_bias": True,
    }, ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias")),
    "llama-fp32-embedding-lora-and-modules-to-save": ("llama", torch.float32, {
        "target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"],
    }, ("q_proj.weight", "embed_tokens.weight", "lm_head.weight")),
    "qwen2-bf16-embedding-lora-and-modules-to-save": ("qwen2", torch.bfloat16, {
        "target_modules": ["o_proj", "embed_tokens"], "modules_to_save": ["lm_head"],
    }, ("o_proj.weight", "embed_tokens.weight", "lm_head.weight")),
    # GPT-2's Conv1D layers store weights transposed (fan_in_fan_out); its base is saved without the
    # `transformer.` prefix its adapter's keys carry.
    "gpt2-fp32-fan-in-fan-out-unprefixed-base": ("gpt2", torch.float32, {
        "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True,
    }, ("c_attn.weight", "c_proj.weight")),
    # Trained on LlamaModel (no head): keys say `layers.0...` where the base says `model.layers.0...`.
    "llama-bf16-adapter-from-bare-model": ("llama-bare", torch.bfloat16, {"target_modules": ["up_proj"]},
                                           ("up_proj.weight",)),
}


@pytest.mark.parametrize("case", CASES)
def test_merge_is_bit_identical_to_peft(tmp_path: Path, case: str) -> None:
    arch, dtype, lora, expect_changed = CASES[case]
    arch, _, variant = arch.partition("-")
    bare = variant == "bare"
    tied = {"tie_word_embeddings": True} if variant == "tied" else {}
    base = make_base(tmp_path / "base", arch, dtype, **tied)
    adapter = make_adapter(base, tmp_path / "adapter", dtype, bare=bare, r=8, lora_alpha=16, **lora)

    result = merged(base, adapter, tmp_path / "out")

    ours, original = read_weights(tmp_path / "out"), read_weights(base)
    reference = peft_merged(base, adapter, dtype, bare).state_dict()
    assert ours.keys() == original.keys()
    changed = set()
    for name, tensor in ours.items():
        assert tensor.dtype == original[name].dtype == dtype, name
        candidates = (name, f"transformer.{name}", name.removeprefix("model."))
        ref_name = next((n for n in candidates if n in reference), None)
        if ref_name is None:  # not in the reference model: a bare model's head
            assert torch.equal(tensor, original[name]), name
            continue
        # Bit-identical in every dtype: PEFT's in-place `weight += delta` also rounds once from float32.
        assert max_ulp(tensor, reference[ref_name].contiguous()) == 0, name
        if not torch.equal(tensor, original[name]):
            changed.add(name)
    assert {".".join(name.split(".")[-2:]) for name in changed} == set(expect_changed)
    assert result.tensors_merged == len(changed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_rounds_like_peft_for_every_weight_value(dtype: torch.dtype) -> None:
    """The merge adds the float32 update through a float32 sum and a copy back (much faster than torch's
    mixed-dtype in-place add); PEFT's `weight.data += delta` is the reference, bit for bit, on every 16-bit
    weight value against updates that round to ties, overflow, vanish, cancel, and NaN with other payloads."""
    weights = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    as_float = weights.float()
    ulp = (torch.nextafter(weights, torch.tensor(float("inf"), dtype=dtype)).float() - as_float).nan_to_num(0)
    torch.manual_seed(0)
    updates = [torch.randn(weights.shape) * scale for scale in (1e-4, 1e-2, 1.0, 1e3)]
    updates += [ulp / 2, -ulp / 2, ulp * 1.5, -as_float, as_float * 2.0**100, torch.full(weights.shape, 1e-40)]
    updates += [torch.full(weights.shape, value) for value in (float("inf"), -float("inf"), -0.0, 0.0)]
    updates += [torch.full(weights.shape, float("nan")), -torch.full(weights.shape, float("nan"))]
    for number, update in enumerate(updates):
        reference = weights.clone()
        reference += update
        ours = weights.clone()
        _add_into(ours, update.clone())
        assert torch.equal(ours.view(torch.int16), reference.view(torch.int16)), number
        # A transposed update (embeddings, fan_in_fan_out) takes the same path through a strided view.
        grid = weights.view(256, 256)
        reference = grid.clone()
        reference += update.view(256, 256).T
        ours = grid.clone()
        _add_into(ours, update.view(256, 256).clone().T)
        assert torch.equal(ours.view(torch.int16), reference.view(torch.int16)), number


def test_a_tensor_of_several_chunks_rounds_like_peft() -> None:
    """The widened sum goes chunk by chunk (ADD_CHUNK elements): a tensor that ends mid-chunk, through the
    merge's reused scratch buffer as in a merge, gives PEFT's bits."""
    torch.manual_seed(1)
    shape = (1031, 769)
    assert 3 * ADD_CHUNK < shape[0] * shape[1] < 4 * ADD_CHUNK
    scratch = _Scratch()
    for dtype in (torch.bfloat16, torch.float16):
        weights = torch.randn(shape).to(dtype)
        update = torch.randn(shape) * 1e-2
        reference = weights.clone()
        reference += update
        ours = weights.clone()
        _add_into(ours, update.clone(), scratch)
        assert torch.equal(ours.view(torch.int16), reference.view(torch.int16)), dtype


# Tied embeddings (Qwen2.5 0.5-3B, Llama 3.2): the base stores no lm_head. An adapter that changes the input
# embedding or the head makes the trained model compute them apart; merge_and_unload keeps the tie (and so
# changes both), which is not the trained model.
TIED = {
    "embedding-lora": ({"target_modules": ["q_proj", "embed_tokens"]}, "embed"),
    "embedding-saved": ({"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}, "embed"),
    "head-saved": ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "head"),
    "head-lora": ({"target_modules": ["q_proj", "lm_head"]}, "head"),
}


@pytest.mark.parametrize("case", TIED)
def test_tied_base_publishes_the_trained_function_untied(tmp_path: Path, case: str) -> None:
    lora, changed = TIED[case]
    base = make_base(tmp_path / "base", "qwen2", torch.float32, tie_word_embeddings=True)
    adapter = make_adapter(base, tmp_path / "adapter", torch.float32, r=8, lora_alpha=16, **lora)

    result = merged(base, adapter, tmp_path / "out")

    ours, original = read_weights(tmp_path / "out"), read_weights(base)
    assert "lm_head.weight" not in original and set(ours) == {*original, "lm_head.weight"}
    assert result.untied and read_json(tmp_path / "out" / "config.json")["tie_word_embeddings"] is False
    embed = "model.embed_tokens.weight"
    kept = "lm_head.weight" if changed == "embed" else embed
    assert torch.equal(ours[kept], original[embed]), "the side the adapter left alone keeps the base's values"
    assert not torch.equal(ours["lm_head.weight"], ours[embed])
    if INDEX in {p.name for p in base.iterdir()}:
        index = read_json(tmp_path / "out" / INDEX)
        assert index["weight_map"]["lm_head.weight"] == index["weight_map"][embed]
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())

    from transformers import AutoModelForCausalLM

    peft_merged(base, adapter, torch.float32).save_pretrained(tmp_path / "peft")  # what PEFT would publish
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 2]])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
        trained = peft_unmerged(base, adapter, torch.float32)(ids).logits
        tied = AutoModelForCausalLM.from_pretrained(tmp_path / "peft")(ids).logits
    torch.testing.assert_close(logits, trained, rtol=1e-5, atol=1e-5)
    assert (logits.argmax(-1) == trained.argmax(-1)).all()
    assert not torch.allclose(tied, trained, atol=1e-3), "PEFT's published, still tied, model is not the trained one"


def test_tied_base_of_a_type_vllm_always_ties_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(model_config("gpt2")).save_pretrained(base)  # ties lm_head to transformer.wte
    adapter = make_adapter(base, tmp_path / "adapter", torch.float32, r=4, target_modules=["c_attn"],
                           modules_to_save=["wte"])
    message = refused(base, adapter, tmp_path / "out")
    assert "ties its output layer to its input embedding" in message and "'gpt2'" in message


def test_lora_bias_is_merged_as_the_trained_forward_pass_scales_it(tmp_path: Path) -> None:
    """PEFT 0.15.2's merge_and_unload adds lora_B.bias unscaled (peft issue 2486); at scale 4 the trained
    model and that merge disagree, ours agrees with the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / "base", "qwen2", torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", torch.float32, r=4, lora_alpha=16,
                           target_modules=["q_proj", "v_proj"], lora_bias=True)
    merged(base, adapter, tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 2]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
        trained = peft_unmerged(base, adapter, torch.float32)(ids).logits
        peft_0_15 = PeftModel.from_pretrained(load_model(base, torch.float32), adapter).merge_and_unload()(ids).logits
    torch.testing.assert_close(ours, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(peft_0_15, trained, atol=1e-3), "the comparison can tell the two apart"


def test_merged_directory_serves_like_peft_with_the_tokenizer_training_saved(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = make_base(tmp_path / "base", "qwen2", torch.bfloat16)
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": False}))
    adapter = make_adapter(base, tmp_path / "adapter", torch.bfloat16, r=8, lora_alpha=16,
                           target_modules="all-linear")
    # LLaMA-Factory's templates replace the EOS (llama3, qwen, ...) and training saves that tokenizer beside
    # the adapter: the published model must stop where the trained one does (llamafactory-cli export
    # publishes this tokenizer too).
    make_tokenizer(adapter, eos_token="<|eot|>")
    progress: list[MergeProgress] = []

    result = merged(base, adapter, tmp_path / "out", progress.append)

    out = tmp_path / "out"
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards and len(shards) > 1
    assert [(p.shard_index, p.shard_count, p.shard_name) for p in progress] == [
        (i, len(shards), name) for i, name in enumerate(shards, start=1)]
    assert progress[-1].bytes_done == progress[-1].bytes_total
    # Same dtype and byte size as the base; an index transformers and vLLM can follow.
    assert (result.dtype, result.shards) == ("bfloat16", len(shards))
    assert directory_bytes(out) == directory_bytes(base)
    index, base_index = read_json(out / INDEX), read_json(base / INDEX)
    assert index["weight_map"] == base_index["weight_map"]
    weights = read_weights(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    # The base's config; the tokenizer training saved; a generation config that stops at the trained EOS too.
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (adapter / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|eot|>" and AutoTokenizer.from_pretrained(base).eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == [eot, 2]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= set(result.copied_files)
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(result.copied_files)
    assert result.output_bytes == sum(p.stat().st_size for p in out.iterdir())

    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 2]])
    with torch.no_grad():
        logits = model(ids).logits
        reference = peft_merged(base, adapter, torch.bfloat16)(ids).logits
        untouched = load_model(base, torch.bfloat16)(ids).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)  # the weights are bit-identical
    assert not torch.allclose(logits, untouched, atol=1e-2)


def test_full_finetune_output_is_copied_as_is(tmp_path: Path) -> None:
    full = make_base(tmp_path / "full", "llama", torch.bfloat16)

    result = merged(full, None, tmp_path / "out")

    ours, original = read_weights(tmp_path / "out"), read_weights(full)
    assert ours.keys() == original.keys()
    assert all(torch.equal(ours[name], original[name]) for name in ours)
    assert result.tensors_merged == 0 and result.dtype == "bfloat16"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (full / "tokenizer.json").read_bytes()


# --- inputs that must be refused -----------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    base = make_base(root / "base", "llama", torch.float32)
    return base, make_adapter(base, root / "adapter", torch.float32, r=8, target_modules="all-linear")


def copies(tmp_path: Path, good: tuple[Path, Path]) -> tuple[Path, Path]:
    base, adapter = (Path(shutil.copytree(src, tmp_path / src.name)) for src in good)
    return base, adapter


def refused(base: Path, adapter: Path, out: Path) -> str:
    out.mkdir()
    with pytest.raises(ConfigError) as caught:
        merge_adapter(base, adapter, out)
    # Refused before anything was written: no half-merged model for anyone to mistake for a result.
    assert not any(out.iterdir())
    assert caught.value.exit_code == ExitCode.CONFIG
    return str(caught.value)


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**read_json(path), **changes}))


def test_dora_is_refused(tmp_path: Path, good: tuple[Path, Path]) -> None:
    adapter = make_adapter(good[0], tmp_path / "dora", torch.float32, r=8, target_modules=["q_proj"],
                           use_dora=True)
    message = refused(good[0], adapter, tmp_path / "out")
    assert "DoRA (use_dora: true)" in message and "not implement" in message


def test_quantized_base_is_refused(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base, adapter = copies(tmp_path, good)
    edit_json(base / "config.json", quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": 1})
    message = refused(base, adapter, tmp_path / "out")
    assert "quantized (bitsandbytes" in message and "unquantized base" in message


def test_adapter_for_another_base_names_tensor_and_shapes(tmp_path: Path, good: tuple[Path, Path]) -> None:
    other = make_base(tmp_path / "other", "llama", torch.float32, intermediate_size=96)
    message = refused(other, good[1], tmp_path / "out")
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight [8, 128]" in message
    assert "base tensor model.layers.0.mlp.down_proj.weight" in message and "shape [64, 96]" in message
    assert "made for another base model" in message


def test_truncated_shard_names_the_file(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base, adapter = copies(tmp_path, good)
    shard = sorted(base.glob("*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 100)
    message = refused(base, adapter, tmp_path / "out")
    assert str(shard) in message and "truncated" in message


def open_files() -> set[str]:
    links = (f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd"))
    return {os.readlink(link) for link in links if os.path.exists(link)}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files in /proc")
@pytest.mark.parametrize("where", ["disk full while the writer thread writes", "error while computing a tensor"])
def test_a_failure_mid_merge_stops_every_thread_and_closes_every_file(
    tmp_path: Path, good: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Writes and fsyncs run in threads of their own while the next tensor is computed: a failure on either
    side reaches the caller, and nothing keeps running on (or holding) the files afterwards."""
    import errno
    import threading

    import entrypoint.lora_merge as lora_merge

    base, adapter = good
    calls = {"n": 0}

    def failing(real, kind):
        def call(*args):
            calls["n"] += 1
            if calls["n"] == 8:  # the third of four shards: the second's fsync may still be running
                raise kind()
            return real(*args)
        return call

    if where.startswith("disk full"):
        monkeypatch.setattr(lora_merge, "write_all", failing(lora_merge.write_all,
                                                             lambda: OSError(errno.ENOSPC, "No space left")))
        expected: type[Exception] = OSError
    else:
        monkeypatch.setattr(lora_merge, "_merged", failing(lora_merge._merged, lambda: RuntimeError("boom")))
        expected = RuntimeError
    before = open_files()
    with pytest.raises(expected):
        merged(base, adapter, tmp_path / "out")
    assert calls["n"] >= 8
    assert not [t.name for t in threading.enumerate() if t.name.startswith("merge-")]
    assert not {f for f in open_files() - before if str(tmp_path) in f or str(base) in f or str(adapter) in f}


@pytest.mark.parametrize(("missing", "expected"), [
    ("adapter_model.safetensors", "has no adapter_model.safetensors"),
    ("adapter_config.json", "has no adapter_config.json: expected a PEFT LoRA adapter"),
])
def test_missing_adapter_file_is_named(
    tmp_path: Path, good: tuple[Path, Path], missing: str, expected: str
) -> None:
    base, adapter = copies(tmp_path, good)
    (adapter / missing).unlink()
    assert expected in refused(base, adapter, tmp_path / "out")


def test_pickled_adapter_says_what_is_allowed(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base, adapter = copies(tmp_path, good)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    assert "only safetensors adapters are supported" in refused(base, adapter, tmp_path / "out")


def test_unused_adapter_tensors_are_named(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base, adapter = copies(tmp_path, good)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    weights["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 8)
    weights["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] = torch.zeros(128)
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    message = refused(base, adapter, tmp_path / "out")
    assert ("adapter tensor base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight has no matching "
            "base tensor model.layers.7.self_attn.q_proj.weight") in message
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector is not a LoRA weight" in message


def test_square_tensor_of_unknown_orientation_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(model_config("gpt2", tie_word_embeddings=False)).save_pretrained(base)
    # PEFT flips fan_in_fan_out per layer type (Conv1D blocks, Linear head) and saves the last value.
    adapter = make_adapter(base, tmp_path / "adapter", torch.float32, r=4, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj", "lm_head"])
    message = refused(base, adapter, tmp_path / "out")
    assert "fan_in_fan_out=False in adapter_config.json does not fit transformer.h.0.attn.c_attn" in message
    assert "square tensors such as transformer.h.0.attn.c_proj.weight" in message


def test_rank_that_contradicts_the_config_is_refused(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base, adapter = copies(tmp_path, good)
    edit_json(adapter / "adapter_config.json", r=4)
    assert "gives rank 4 for model.layers.0.mlp.down_proj" in refused(base, adapter, tmp_path / "out")


def test_pickle_base_says_only_safetensors(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base = tmp_path / "bin-base"
    load_model(good[0], torch.float32).save_pretrained(base, safe_serialization=False)
    message = refused(base, good[1], tmp_path / "out")
    assert "found pytorch_model.bin" in message and "Only safetensors bases are supported" in message


def test_adapter_tokenizer_with_added_tokens_is_refused(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base, adapter = copies(tmp_path, good)
    make_tokenizer(adapter, extra_tokens=("<tool_call>",))
    message = refused(base, adapter, tmp_path / "out")
    assert "1 tokens the base lacks (e.g. '<tool_call>')" in message and "vocabulary was resized" in message


# --- memory -----------------------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from entrypoint.lora_merge import merge_adapter

    def peak_mb():
        # VmHWM belongs to this process image only; ru_maxrss would inherit the parent's peak.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    # Load the kernels the merge uses, so the baseline holds torch's code and pools, not the model.
    w = torch.ones(64, 64, dtype=torch.bfloat16)
    delta = torch.empty(64, 64)
    torch.matmul(torch.ones(64, 8), torch.ones(8, 64), out=delta)
    delta *= 2.0
    w += delta
    before = peak_mb()
    merge_adapter(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    print(json.dumps({"before": before, "after": peak_mb()}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_stays_below_one_shard(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", "llama", torch.float32, max_shard_size="40MB", vocab_size=8000,
                     hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                     num_key_value_heads=8)
    adapter = make_adapter(base, tmp_path / "adapter", torch.float32, r=8, target_modules="all-linear")
    (tmp_path / "out").mkdir()
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) >= 5 and directory_bytes(base) > 180e6

    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(base), str(adapter), str(tmp_path / "out")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
    )

    peak = json.loads(run.stdout)
    growth_mb = peak["after"] - peak["before"]
    largest_shard_mb = max(p.stat().st_size for p in shards) / 2**20
    adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    # A shard-at-a-time merge would need a whole shard; this one needs about one tensor.
    assert growth_mb < largest_shard_mb + adapter_mb, (peak, largest_shard_mb, adapter_mb)
    assert read_weights(tmp_path / "out").keys() == read_weights(base).keys()


# --- serving the adapter with vLLM instead ----------------------------------------------------------


def test_plain_linear_adapter_is_servable_by_vllm(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base = good[0]
    adapter = make_adapter(base, tmp_path / "adapter", torch.float32, r=12, lora_alpha=24,
                           target_modules=["q_proj", "o_proj"])

    assert check_vllm_lora(adapter, base) == []
    plan = vllm_lora_instructions(adapter, "support-bot")
    assert plan.serve_args == (
        "--enable-lora", "--lora-modules", f"support-bot={adapter}", "--max-lora-rank", "16")
    assert plan.runtime_env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert (plan.load_method, plan.load_path) == ("POST", "/v1/load_lora_adapter")
    assert plan.load_body == {"lora_name": "support-bot", "lora_path": str(adapter)}
    assert '"lora_name": "support-bot"' in plan.text()
    with pytest.raises(ConfigError, match="max_lora_rank 8 is not valid for an adapter of rank 12"):
        vllm_lora_instructions(adapter, "support-bot", max_lora_rank=8)


def test_adapter_vllm_cannot_serve_gets_reasons(tmp_path: Path, good: tuple[Path, Path]) -> None:
    base = good[0]
    adapter = make_adapter(base, tmp_path / "adapter", torch.float32, r=8, modules_to_save=["lm_head"],
                           target_modules=["q_proj", "embed_tokens"], rank_pattern={"q_proj": 4})

    problems = "\n".join(check_vllm_lora(adapter, base))

    assert "rank_pattern/alpha_pattern" in problems
    assert "modules_to_save is ['lm_head']" in problems
    assert "embed_tokens.lora_embedding_A is not LoRA on a linear layer" in problems
    missing = tmp_path / "nowhere"
    assert check_vllm_lora(missing, base) == [f"adapter directory {missing} does not exist"]
