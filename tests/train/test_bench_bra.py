"""bench-bra cells (smoke, in-process, small): each returns time and memory."""

from train.bench_bra import _run_cell


def test_2d_and_1d_cells_report_time_and_memory():
    for cell in (
        ("2d", "block-sparse core", "fwd+bwd", 1, 1, "cpu", 0, 0, 0),
        ("2d", "gather reference", "fwd", 1, 1, "cpu", 0, 0, 0),
        ("1d", "causal BRA", "fwd+bwd", 256, 1, "cpu", 64, 2, 16),
        ("1d", "dense SDPA", "fwd", 256, 1, "cpu", 64, 2, 16),
    ):
        r = _run_cell(*cell)
        assert r["ms"] > 0 and r["kv_mib"] > 0 and "peak_mib" in r
