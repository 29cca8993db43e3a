"""`auraflow-edge bench` on the tiny model: JSON schema, fidelity fields, grid and plot."""

import json

from auraflow_edge.engine.cli.main import main


def test_bench_writes_json_grid_and_plot(tiny_dir, tmp_path, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "p.png"
    rc = main(
        [
            "--quiet",
            "bench",
            str(tiny_dir),
            "--precisions",
            "fp32,int8",
            "--steps",
            "3",
            "--height",
            "64",
            "--width",
            "96",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["reference_precision"] == "fp32"
    for p in ("fp32", "int8"):
        row = r["precisions"][p]
        for key in (
            "text_encode_s",
            "step_s",
            "vae_s",
            "total_s",
            "peak_bytes",
            "process_peak_rss",
            "disk_bytes",
            "resident_bytes",
        ):
            assert key in row, key
        fid = row["fidelity_vs_fp32"]
        assert {"step0_cos", "step0_rel_l2", "step2_cos", "image_psnr_db"} <= set(fid)
    assert r["precisions"]["fp32"]["fidelity_vs_fp32"]["image_psnr_db"] == 99.0
    assert 0.99 < r["precisions"]["int8"]["fidelity_vs_fp32"]["step2_cos"] < 1.0
    d = r["baselines"]["diffusers fp32"]
    assert d["fidelity_vs_fp32"]["step0_cos"] > 0.99999  # same noise, same model: the baseline agrees
    assert set(r["ratios_vs_diffusers_fp32"]) == {"fp32", "int8"}
    b = r["baselines"]["diffusers bf16"]  # bf16 rounding only: close to fp32, not equal
    assert 0.99 < b["fidelity_vs_fp32"]["step0_cos"] < 1.0
    assert set(r["ratios_vs_diffusers_bf16"]) == {"fp32", "int8"}
    assert plot.stat().st_size > 1000 and (tmp_path / "r_grid.png").exists()
    printed = capsys.readouterr().out
    assert "ours int8 / diffusers fp32" in printed and "ours int8 / diffusers bf16" in printed


def test_profile_summary_shares_and_rates():
    from auraflow_edge.bench.cpu_profile import summarise

    def node(op, dur, ins, outs):
        return {
            "cat": "Node",
            "name": f"{op}_1_kernel_time",
            "dur": dur,
            "args": {"op_name": op, "input_type_shape": ins, "output_type_shape": outs},
        }

    run = [
        node("MatMul", 100, [{"float": [2, 10, 8]}, {"float": [8, 4]}], [{"float": [2, 10, 4]}]),
        node("DynamicQuantizeMatMul", 50, [{"float": [20, 8]}, {"int8": [8, 6]}, {"float": [6]}], []),
        node("Softmax", 250, [{"float": [2, 5]}], [{"float": [2, 5]}]),
        {"cat": "Session", "name": "model_run", "dur": 9999},
    ]
    s = summarise(run * 2, runs=2)
    ops = s["ops"]
    assert list(ops) == ["Softmax", "MatMul", "DynamicQuantizeMatMul"]  # by time
    assert abs(s["node_seconds_per_call"] - 400e-6) < 1e-12
    assert abs(ops["Softmax"]["share"] - 250 / 400) < 1e-12
    # 2 * (2*10) * 8 * 4 = 1280 FLOP in 100 us; 2 * 20 * 8 * 6 = 1920 FLOP in 50 us
    assert abs(ops["MatMul"]["gflop_per_s"] - 1280 / 100e-6 / 1e9) < 1e-9
    assert abs(ops["DynamicQuantizeMatMul"]["gflop_per_s"] - 1920 / 50e-6 / 1e9) < 1e-9
    assert abs(ops["Softmax"]["gb_per_s"] - 80 / 250e-6 / 1e9) < 1e-9 and "gflop_per_s" not in ops["Softmax"]
