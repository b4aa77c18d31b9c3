"""The GPU path, checked and measured in one run (under five minutes on one H100):

    python -m ember.runtime.devtools.gpu_check [--json gpu.json] [--skip-bench]

1. Correctness on the GPU in bf16: Ember's logits against transformers' (same device, same dtype) on a tiny
   model, prefill and decode through the paged cache; greedy continuations compared.
2. Multi-LoRA on the GPU: every row of a mixed batch of three adapters against PEFT with that adapter.
3. The compiled decode step (CUDA graphs) against the eager one in fp32: greedy tokens and log-probabilities.
4. Every other family (Qwen3, Gemma 2/3, Phi-3, Mistral and Qwen2 with sliding windows, Mixtral, Qwen3-MoE) in
   bf16 against transformers on the same device: each tiny model's logits through the paged cache.
5. Tensor parallelism, where the machine has 2 or more GPUs (said skipped otherwise): 2 ranks (NCCL) against one
   GPU in fp32, logits and greedy answers, with addons in the batch.
6. The benchmark on a random model of Llama-3.1-8B's shapes (`bench-8b`, 16 GB in bf16): batch-1 decode
   tokens/s as a share of the HBM roofline (weight bytes read per token against the GPU's bandwidth), eager
   and compiled in bf16 and compiled in fp8 (where the GPU has it), with each compile's time; and
   throughput with 64 concurrent requests, compiled; with 2 GPUs, batch-1 decode split across both too.

CI has no GPU: this is run by hand (or by a session lent one) and its figures go in the README. transformers
and peft are references here, as in the tests. Exits 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ember.runtime.devtools import tinymodels
from ember.runtime.devtools.bench_precisions import prompt_logits, weight_bytes
from ember.runtime.devtools.workload import Workload, make_workload, progress, run_ember
from ember.runtime.engine.engine import Engine, EngineConfig
from ember.runtime.model.quantized import fp8_hardware, fp8_kernels
from ember.runtime.model.sampling import SamplingParams

# Peak memory bandwidth by GPU name (vendor figures, TB/s); the roofline's denominator.
HBM_TB_S = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8, "A100-SXM4-80GB": 2.04,
            "A100 80GB PCIe": 1.94, "A100-SXM4-40GB": 1.56, "L40S": 0.864, "L4": 0.3}
BF16_LOGIT_SHARE = 0.03  # largest logit difference allowed, as a share of the largest logit
# With strong random adapters on every projection, PEFT's bf16 order of operations (each LoRA product rounded
# to bf16 before it is added) and Ember's differ more: measured 0.045-0.063 on a CPU in bf16.
BF16_LORA_LOGIT_SHARE = 0.1


def bandwidth(name: str) -> float | None:
    return next((tb for key, tb in HBM_TB_S.items() if key in name), None)


def logits_share(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def check_logits(root: Path, device: str = "cuda") -> dict:
    from transformers import AutoModelForCausalLM  # a reference (a dev dependency), as in the tests

    directory = tinymodels.make_model(root / "tiny", "small", seed=11, init_std=0.1)
    engine = Engine.from_dir(directory, EngineConfig(device=device, precision="bf16", kv_cache_tokens=8192))
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    tokens = list(range(20, 220))
    with torch.no_grad():
        reference = hf(torch.tensor([tokens], device=device)).logits[0]
    share = logits_share(prompt_logits(engine, tokens), reference)
    prompts = [list(range(30 + 7 * i, 90 + 11 * i)) for i in range(8)]
    ours = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    same = 0
    with torch.no_grad():
        for prompt, out in zip(prompts, ours):
            hf.generation_config.eos_token_id = None
            theirs = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=24, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
            same += theirs == out.token_ids
    return {"check": "bf16 logits vs transformers", "max_logit_share": round(share, 5),
            "greedy_equal": f"{same}/{len(prompts)}", "ok": share <= BF16_LOGIT_SHARE}


def check_families(root: Path, device: str = "cuda") -> dict:
    from transformers import AutoModelForCausalLM

    shares = {}
    tokens = list(range(20, 120))  # past every tiny model's sliding window
    for family in tinymodels.FAMILIES:
        directory = tinymodels.make_family_model(root / family, family, seed=3)
        engine = Engine.from_dir(directory, EngineConfig(device=device, precision="bf16", kv_cache_tokens=1024))
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
        with torch.no_grad():
            reference = hf(torch.tensor([tokens], device=device)).logits[0]
        shares[family] = round(logits_share(prompt_logits(engine, tokens), reference), 5)
    return {"check": "bf16 logits of every family vs transformers", "max_logit_share": shares,
            "ok": max(shares.values()) <= BF16_LOGIT_SHARE}


def check_lora(root: Path, device: str = "cuda") -> dict:
    import peft  # references (dev dependencies), as in the tests
    from transformers import AutoModelForCausalLM

    directory = root / "tiny"
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapters = {f"accounts/acme/models/a{i}": tinymodels.make_lora(directory, root / f"lora{i}", seed=i + 1,
                                                                  init_std=0.1, rank=8, target_modules=modules[: 2 + 2 * i])
                for i in range(3)}
    engine = Engine.from_dir(directory, EngineConfig(device=device, precision="bf16", kv_cache_tokens=8192, max_loras=4,
                                                     max_lora_rank=8))
    for name, path in adapters.items():
        engine.lora.add(name, path)
    tokens = list(range(40, 140))
    shares = {}
    for name, path in adapters.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device)
            model = peft.PeftModel.from_pretrained(hf, path).eval()
        with torch.no_grad():
            reference = model(torch.tensor([tokens], device=device)).logits[0]
        shares[name] = round(logits_share(prompt_logits(engine, tokens, name), reference), 5)
    # One mixed batch: each row's tokens equal that adapter's alone.
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    names = list(adapters) + [None]
    mixed = engine.generate([tokens] * len(names), params, names)
    alone = [engine.generate([tokens], params, [n])[0] for n in names]
    same = sum(m.token_ids == a.token_ids for m, a in zip(mixed, alone))
    return {"check": "multi-LoRA vs PEFT (bf16)", "max_logit_share": shares, "mixed_batch_equal": f"{same}/{len(names)}",
            "ok": max(shares.values()) <= BF16_LORA_LOGIT_SHARE and same == len(names)}


def check_compiled(root: Path, device: str = "cuda") -> dict:
    # In fp32, where the fused kernels' different rounding (bf16 intermediates kept in fp32) cannot flip
    # near-tied tokens: greedy must be identical.
    directory = root / "tiny"
    config = dict(device=device, precision="fp32", kv_cache_tokens=8192, max_num_seqs=16)
    eager = Engine.from_dir(directory, EngineConfig(**config))
    compiled = Engine.from_dir(directory, EngineConfig(**config, compile=True))
    prompts = [list(range(30 + 5 * i, 60 + 13 * i)) for i in range(12)]
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0, ignore_eos=True, logprobs=3) for i in range(12)]
    ours, theirs = compiled.generate(prompts, params), eager.generate(prompts, params)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs))
    gaps = [abs(x.logprob - y.logprob) for a, b in zip(ours, theirs) for x, y in zip(a.logprobs, b.logprobs)
            if x.token_id == y.token_id]
    return {"check": "compiled decode vs eager (fp32)", "greedy_equal": f"{same}/{len(prompts)}",
            "max_logprob_gap": round(max(gaps), 6), "compile_s": round(compiled.runner.forward.compiled.compile_seconds, 1),
            "compiled_steps": compiled.runner.forward.compiled.steps,
            "ok": same == len(prompts) and max(gaps) <= 1e-3 and compiled.runner.forward.compiled.steps > 0}


def check_tensor_parallel(root: Path, device: str = "cuda") -> dict:
    name = "tensor parallel: 2 ranks vs 1 device (fp32)"
    if device == "cuda" and torch.cuda.device_count() < 2:
        return {"check": name, "skipped": f"{torch.cuda.device_count()} GPU here; it needs 2", "ok": True}
    directory = root / "tiny"
    adapter = tinymodels.make_lora(directory, root / "tp-lora", seed=5, init_std=0.1, rank=8,
                                   target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    prompts = [list(range(30 + 5 * i, 60 + 13 * i)) for i in range(6)]
    names = [None, "accounts/acme/models/tp"] * 3
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    results = []
    for size in (1, 2):
        engine = Engine.from_dir(directory, EngineConfig(device=device, precision="fp32", kv_cache_tokens=8192,
                                                         max_loras=2, max_lora_rank=8, tensor_parallel_size=size))
        try:
            engine.lora.add(names[1], adapter)
            results.append((prompt_logits(engine, prompts[-1], names[1]),
                            [c.token_ids for c in engine.generate(prompts, params, names)]))
        finally:
            engine.close()
    share = logits_share(results[1][0], results[0][0])
    same = sum(a == b for a, b in zip(results[0][1], results[1][1]))
    return {"check": name, "max_logit_share": round(share, 7), "greedy_equal": f"{same}/{len(prompts)}",
            "ok": share <= 1e-4 and same == len(prompts)}


def decode_figures(engine: Engine, vocab: int, tb_s: float | None) -> dict:
    """Batch-1 decode of a 128-token prompt: tokens/s and its share of the roofline."""
    prompt = make_workload(1, (128, 128), (1, 1), vocab, seed=3).prompts[0]
    run_ember(engine, Workload([prompt], [16]), name="warm-up")
    torch.cuda.synchronize()
    decode = run_ember(engine, Workload([prompt], [128]), name="batch-1 decode")
    rate = 127 / (decode.latencies[0] - decode.ttfts[0])
    read_per_token = weight_bytes(engine)
    roofline = tb_s * 1e12 / read_per_token if tb_s else None
    compiled = engine.runner.forward.compiled
    return {"weight_gb": round(read_per_token / 1e9, 2), "batch1_decode_tokens_per_s": round(rate, 1),
            "roofline_tokens_per_s": round(roofline, 1) if roofline else None,
            "roofline_share": round(rate / roofline, 3) if roofline else None,
            "compile_s": round(compiled.compile_seconds, 1) if compiled else None}


def bench_8b(root: Path) -> dict:
    progress("writing a random model of Llama-3.1-8B's shapes (16 GB in bf16)")
    start = time.perf_counter()
    directory = tinymodels.make_model(root / "bench-8b", "bench-8b", seed=0, dtype=torch.bfloat16, shards=8)
    progress(f"written in {time.perf_counter() - start:.0f} s; loading")
    name = torch.cuda.get_device_name()
    tb_s = bandwidth(name)
    report = {"gpu": name, "hbm_tb_s": tb_s}
    has_fp8 = "scaled-mm" in fp8_kernels(*fp8_hardware(torch.device("cuda")))
    runs = [("bf16 eager", "bf16", False, 1), ("bf16 compiled", "bf16", True, 1)]
    runs += [("fp8 compiled", "fp8", True, 1)] if has_fp8 else []
    runs += [("bf16 compiled, 2 GPUs", "bf16", True, 2)] if torch.cuda.device_count() >= 2 else []
    for label, dtype, compiled, size in runs:
        progress(f"{label}: loading" + (" and compiling" if compiled else ""))
        engine = Engine.from_dir(directory, EngineConfig(device="cuda", precision=dtype, max_num_seqs=64,
                                                         max_num_batched_tokens=8192, compile=compiled,
                                                         tensor_parallel_size=size))
        vocab = engine.model.config.vocab_size
        report[label] = decode_figures(engine, vocab, tb_s)
        progress(f"{label}: {report[label]}")
        if label == "bf16 compiled":
            progress("64 concurrent requests")
            run_ember(engine, make_workload(8, (64, 64), (8, 8), vocab, seed=1), name="warm-up")
            report["concurrent_64"] = run_ember(engine, make_workload(64, (128, 512), (128, 128), vocab, seed=0),
                                                name="64 concurrent").summary()
        engine.close()
        del engine
        torch.cuda.empty_cache()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.runtime.devtools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-bench", action="store_true", help="correctness checks only")
    parser.add_argument("--skip-compiled", action="store_true", help="without the compiled step's check")
    parser.add_argument("--device", default="cuda", help="cpu runs the checks (not the benchmark) without a GPU")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ember-gpu-") as tmp:
        root = Path(tmp)
        report = {"checks": [check_logits(root, args.device), check_lora(root, args.device),
                             check_families(root, args.device)]}
        if not args.skip_compiled:
            report["checks"].append(check_compiled(root, args.device))
        report["checks"].append(check_tensor_parallel(root, args.device))
        for check in report["checks"]:
            print(json.dumps(check))
        if not args.skip_bench and args.device == "cuda":
            report["bench"] = bench_8b(root)
            print(json.dumps(report["bench"], indent=2))
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(f"gpu_check: {report['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
