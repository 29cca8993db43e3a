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
