"""The benchmark runs both engines on the same work and reports figures (not a speed test: see README)."""

import json

import pytest

from ember.runtime.devtools import bench, tinymodels

pytest.importorskip("transformers")


@pytest.mark.slow
def test_benchmark_reports_both_engines_on_the_same_work(tmp_path, tiny_model, capsys):
    report_path = tmp_path / "report.json"
    assert bench.main(["--model", str(tiny_model), "--requests", "5", "--prompt-len", "8", "40",
                       "--output-len", "4", "30", "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "throughput ratio ember / transformers" in printed
    report = json.loads(report_path.read_text())
    (ours, theirs), = report["runs"]
    assert ours["output_tokens"] == theirs["output_tokens"] == sum(report["work"]["output_lens"])
    assert report["identical_greedy_outputs"] == 5  # the same requests, decoded the same way
    assert ours["ttft_p50_s"] <= ours["latency_p50_s"] and report["throughput_ratio"] > 0


def test_workload_is_fixed_by_its_seed():
    a = bench.make_workload(16, (32, 256), (16, 128), 32000, seed=0)
    assert a == bench.make_workload(16, (32, 256), (16, 128), 32000, seed=0)
    assert a != bench.make_workload(16, (32, 256), (16, 128), 32000, seed=1)
    assert all(32 <= len(p) <= 256 for p in a.prompts) and all(16 <= n <= 128 for n in a.output_lens)


@pytest.mark.slow
def test_multi_lora_benchmark_reports_every_mix(tmp_path, capsys):
    from ember.runtime.devtools import tinymodels

    model = tinymodels.make_model(tmp_path / "bench-model", "tiny", seed=0)
    report_path = tmp_path / "lora.json"
    assert bench.main(["--model", str(model), "--lora", "--lora-rank", "4", "--requests", "16", "--prompt-len", "4", "20",
                       "--output-len", "2", "10", "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "16 distinct adapters cost" in printed and "ember / transformers+peft" in printed
    report = json.loads(report_path.read_text())
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["ember base-only", "ember 1 adapters", "ember 4 adapters", "ember 16 adapters", "transformers+peft"]
    assert report["identical_greedy_outputs_vs_peft"] == 16  # PEFT's mixed batch gives the same tokens
    assert len(list((tmp_path / "bench-model-loras-r4-q-k-v-o").iterdir())) == 16


def test_prefix_cache_benchmark_compares_off_and_on(tmp_path, tiny_model, capsys):
    report_path = tmp_path / "prefix.json"
    assert bench.main(["--model", str(tiny_model), "--shared-prefix", "64", "--requests", "6", "--prompt-len", "4", "20",
                       "--output-len", "2", "8", "--repeat", "2", "--json", str(report_path)]) == 0
    assert "p50 time to first token, one at a time, off / on" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert len(report["runs"]) == 2 and report["identical_greedy_outputs"] == 6
    off, on = report["runs"][-1]
    assert off["output_tokens"] == on["output_tokens"] > 0
    assert report["ttft_p50_ratio"] > 0 and report["throughput_ratio"] > 0


def test_precision_report_compares_each_precision_with_the_first(tmp_path, capsys):
    from ember.runtime.devtools import tinymodels

    model = tinymodels.make_model(tmp_path / "m", "tiny", seed=11, init_std=0.1, intermediate_size=192)
    report_path = tmp_path / "precisions.json"
    assert bench.main(["--model", str(model), "--precisions", "fp32,bf16,int8,int4", "--requests", "4",
                       "--prompt-len", "8", "20", "--output-len", "4", "8", "--json", str(report_path)]) == 0
    assert "perplexity on a fixed" in capsys.readouterr().out
    rows = json.loads(report_path.read_text())["precisions"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "int8", "int4"]
    assert rows[0]["greedy_token_agreement"] == 1.0 and rows[0]["greedy_requests_equal"] == 4
    assert rows[0]["weight_bytes"] > rows[1]["weight_bytes"] > rows[2]["weight_bytes"] > rows[3]["weight_bytes"]
    assert all(r["perplexity"] > 1 and r["decode_tokens_per_s"] > 0 for r in rows)


def test_the_peer_benchmark_drives_servers_with_one_workload_and_plots(tmp_path, capsys):
    from tests.runtime.server_helpers import BASE, start

    from ember.runtime.devtools import bench_peer, bench_precisions

    server = start(tmp_path / "server")
    try:
        work = bench_precisions.text_workload(server.model_dir, 3, (8, 24), (2, 6), seed=0)
        assert work == bench_precisions.text_workload(server.model_dir, 3, (8, 24), (2, 6), seed=0)
        assert all(8 <= len(p) <= 24 for p in work.prompts)
        key = server.keys["acme"]
        other = bench_precisions.text_workload(server.model_dir, 3, (8, 24), (2, 6), seed=1)
        rows = bench_peer.drive({"one": (server.url, key, BASE), "two": (server.url, key, BASE)}, [work, other], [1, 2],
                                rounds=1)
    finally:
        server.stop()
    assert [(r["server"], r["concurrency"]) for r in rows] == [("one", 1), ("two", 1), ("one", 2), ("two", 2)]
    assert [r["output_tokens"] for r in rows] == [work.output_tokens] * 2 + [other.output_tokens] * 2
    assert all(r["ttft_p50_ms"] > 0 for r in rows)
    bench_peer.plot(rows, tmp_path / "peer.png")
    assert (tmp_path / "peer.png").read_bytes()[:4] == b"\x89PNG"


def test_the_gpu_check_runs_its_correctness_checks_on_the_cpu(tmp_path):
    from ember.runtime.devtools import gpu_check

    report_path = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--skip-bench", "--json", str(report_path)]) == 0
    checks = json.loads(report_path.read_text())["checks"]
    assert [c["ok"] for c in checks] == [True] * 5 and "bench" not in json.loads(report_path.read_text())
    assert set(checks[2]["max_logit_share"]) == set(tinymodels.FAMILIES)  # bf16 on the CPU, each family
    assert checks[3]["compiled_steps"] > 0 and checks[3]["greedy_equal"] == "12/12"
    # tensor parallelism over gloo on the CPU (on a GPU machine, NCCL where it has 2 GPUs)
    assert checks[4]["check"].startswith("tensor parallel") and checks[4]["greedy_equal"] == "6/6"


@pytest.mark.slow
def test_the_gateway_benchmark_runs_direct_through_the_gateway_and_on_two_replicas(tmp_path, tiny_model, capsys):
    from ember.runtime.devtools import bench_gateway

    report_path, plot = tmp_path / "gateway.json", tmp_path / "gateway.png"
    assert bench_gateway.main(["--model", str(tiny_model), "--requests", "6", "--prompt-len", "8", "24",
                               "--output-len", "4", "12", "--concurrency", "2", "--repeat", "2", "--no-compile",
                               "--json", str(report_path), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "through the gateway at concurrency 2: p50 TTFT" in printed and plot.stat().st_size > 0
    report = json.loads(report_path.read_text())
    runs = [run for pair in report["overhead"]["runs"] for run in pair.values()]
    runs += [report["scaling"]["one"], report["scaling"]["two"]]
    assert len(runs) == 6 and all(run["tokens_per_s"] > 0 and run["ttft_p50_ms"] > 0 for run in runs)
    assert report["overhead"]["throughput_ratio"] > 0 and report["scaling"]["ratio"] > 0
