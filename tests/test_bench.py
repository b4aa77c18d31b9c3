"""The benchmark runs both engines on the same work and reports figures (not a speed test: see README)."""

import json

import pytest

from ember.runtime import bench

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
    from ember.runtime import tinymodels

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
