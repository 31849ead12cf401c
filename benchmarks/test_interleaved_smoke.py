"""Smoke run of benchmarks/interleaved.py (tiny layer shape, aot_eager), so that the script cannot rot."""

from __future__ import annotations

import json

import interleaved


def test_interleaved_smoke(tmp_path):
    out = tmp_path / "r.json"
    assert interleaved.main(["--smoke", "--rounds", "2", "--models", "", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["benchmarks"]
    providers = {r["extra_info"]["provider"] for r in rows}
    assert {"official", "paca-cpu", "paca-cpu-compiled", "official-compiled"} <= providers
    assert all(len(r["stats"]["data"]) == 2 and r["stats"]["median"] > 0 for r in rows)


def test_interleaved_bf16_smoke(tmp_path):
    """The bf16 comparison (--bf16): every provider timed, each held to the 2x accuracy rule first."""
    out = tmp_path / "r.json"
    assert interleaved.main(["--bf16", "--smoke", "--rounds", "2", "--batches", "1", "--models", "",
                             "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["benchmarks"]
    assert {r["extra_info"]["provider"] for r in rows} == {p for p, _, _ in interleaved.BF16_PROVIDERS}
    assert {r["extra_info"]["dtype"] for r in rows} == {"bfloat16", "float32"}


def test_deploy_interleaved_smoke(tmp_path):
    """benchmarks/deploy_interleaved.py --smoke: every deployment path exported, checked against the
    reference model and timed, at B = 1 (a batch the exports must still serve dynamically) and 2."""
    import pytest

    from paca_kernels import _ext, deploy

    if deploy.onnx_available() or not _ext.available():
        pytest.skip(deploy.onnx_available() or f"C++ extension: {_ext.unavailable_reason()}")
    import deploy_interleaved

    out = tmp_path / "d.json"
    assert deploy_interleaved.main(["--smoke", "--models", "tiny", "--batches", "1,2", "--rounds", "2",
                                    "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["benchmarks"]
    assert {r["extra_info"]["provider"] for r in rows} == {"onnxrt-reference", "onnxrt-paca", "aoti", "cpu",
                                                            "cpu-compiled"}
    assert sorted({r["extra_info"]["batch"] for r in rows}) == [1, 2]
    assert all(r["extra_info"]["suite"] == "deploy" and r["stats"]["median"] > 0 for r in rows)


def test_interleaved_train_smoke(tmp_path):
    """benchmarks/interleaved_train.py --smoke: every provider's step checked and timed, train rows."""
    import interleaved_train

    out = tmp_path / "t.json"
    assert interleaved_train.main(["--smoke", "--rounds", "2", "--batch", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["benchmarks"]
    assert {r["extra_info"]["provider"] for r in rows} == {"official", "reference", "cpu", "reference-compiled",
                                                           "cpu-compiled"}
    assert all(r["extra_info"]["suite"] == "train" and r["extra_info"]["flops"] > 0 for r in rows)
