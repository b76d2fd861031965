"""The grid's tuning, convergence and replicate rules on hand-made cases."""

import numpy as np
import pytest

from ehrjax.benchmark.grid import choose_candidate, convergence, replicate_rows


def test_the_tuning_picks_the_lowest_mean_validation_loss():
    best_loss = np.array([[0.40, 0.30, 0.35],   # mean 0.35
                          [0.31, 0.33, 0.32],   # mean 0.32: chosen
                          [0.20, 0.50, 0.45]])  # mean 0.383: the single best replicate does not decide
    assert choose_candidate(best_loss) == 1


def test_a_diverged_candidate_is_never_chosen():
    assert choose_candidate(np.array([[np.nan, 0.1], [0.5, 0.5], [0.4, np.inf]])) == 1
    assert choose_candidate(np.array([[np.nan], [np.nan]])) == 0


def test_convergence_counts_steps_to_95_percent_of_the_gain_over_chance():
    history = [{"step": 10, "val_auroc": 0.60}, {"step": 20, "val_auroc": 0.78}, {"step": 30, "val_auroc": 0.80}]
    # best gain 0.30, target 0.5 + 0.285 = 0.785: reached at step 30, not at 0.78
    assert convergence(history, 0.5) == (30, 15.0)
    history[1]["val_auroc"] = 0.79
    assert convergence(history, 0.5) == (20, 10.0)
    assert convergence([{"step": 5, "val_auroc": 0.45}], 1.0) == (None, None)


@pytest.mark.parametrize("size", [1, 64, 250])
def test_replicates_draw_their_own_nested_labelled_sets(size):
    pool = np.arange(100, 1100)
    sets = [replicate_rows(pool, r, size) for r in range(3)]
    for r, rows in enumerate(sets):
        assert len(rows) == size and len(np.unique(rows)) == size and np.isin(rows, pool).all()
        assert set(rows) <= set(replicate_rows(pool, r, 400))  # nested within a replicate
        np.testing.assert_array_equal(rows, replicate_rows(pool, r, size))  # deterministic
    if size > 1:
        assert len({tuple(s) for s in sets}) == 3
    with pytest.raises(ValueError, match="exceeds"):
        replicate_rows(pool, 0, 1001)


def test_cells_go_longest_first_to_the_least_loaded_process():
    from ehrjax.benchmark.grid import assign_cells

    assert assign_cells([5.0, 1.0, 4.0, 3.0, 0.0], 2) == [0, 0, 1, 1, 0]  # loads 6 and 7
    assert assign_cells([2.0, 2.0, 2.0], 1) == [0, 0, 0]
    assert assign_cells([1.0, 1.0], 4) == [0, 1]


def test_cell_costs_rank_neural_above_baselines_above_ceilings():
    from ehrjax.benchmark.grid import cell_cost
    from ehrjax.train.arms import Arm

    neural = Arm("scratch", lr_grid=(1e-4, 3e-4, 1e-3))
    assert cell_cost(neural, 64, 3, 150) == 3 * 3 * (10 + 16) + 50
    assert cell_cost(neural, 1000, 3, 150) == 3 * 3 * 150 + 50
    assert 0 < cell_cost(Arm("logreg", kind="logreg"), 1000, 3, 150) < cell_cost(neural, 64, 3, 150)
    assert cell_cost(Arm("oracle", kind="oracle"), 0, 3, 150) == 0.0
