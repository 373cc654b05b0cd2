"""Test-wide settings: float64 available (references are dense float64), strict checks, a
compilation cache shared by the test processes, and which variants run only in the slow tier."""

import os
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

# Many tests build the same program from different Python closures (the same solver on the
# same problem shapes), and both xdist workers compile the same programs. XLA's persistent
# cache keys on the program itself (and the jax/XLA version and backend), so they compile it
# once. It lives in the checkout (ignored by git): a clean clone starts empty.
# HESSFREE_TEST_CACHE=0 turns it off (e.g. to time compiles).
if os.environ.get("HESSFREE_TEST_CACHE", "1") != "0":
    _cache = pathlib.Path(__file__).resolve().parent.parent / ".jax_test_cache"
    jax.config.update("jax_compilation_cache_dir", str(_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402

# Variants left to the slow tier (``pytest -m slow``) to keep CI's suite within its budget.
# Each is a twin of a check CI keeps: the same test on another method, dtype, loss or problem
# size, or a heavier model than one CI already runs. Entries match node ids by prefix.
SLOW_VARIANTS = (
    # minimize: CI keeps trust-ncg on every problem and newton-cg on Rosenbrock
    "tests/test_minimize.py::test_auto_preconditioner_under_jit_vmap_and_grad",
    "tests/test_minimize.py::test_auto_preconditioner_same_answer_as_scipy_with_far_fewer_products[newton-cg]",
    "tests/test_minimize.py::test_preconditioner_same_answer_fewer_products",
    "tests/test_minimize.py::test_ill_scaled_logistic_regression_over_a_pytree[newton-cg]",
    "tests/test_minimize.py::test_against_scipy[rosenbrock_extended-newton-cg]",
    "tests/test_minimize.py::test_against_scipy[wood-newton-cg]",
    "tests/test_minimize.py::test_against_scipy[powell_singular-newton-cg]",
    "tests/test_minimize.py::test_against_scipy[helical_valley-newton-cg]",
    "tests/test_minimize.py::test_against_scipy[beale-newton-cg]",
    "tests/test_minimize.py::test_diagonal_preconditioner_same_minimizer_as_scipy[helical_valley",
    "tests/test_minimize.py::test_diagonal_preconditioner_same_minimizer_as_scipy[wood",
    "tests/test_minimize.py::test_diagonal_preconditioner_same_minimizer_as_scipy[beale",
    "tests/test_minimize.py::test_auto_preconditioner_leaves_short_solves_alone[rosenbrock-newton-cg]",
    "tests/test_minimize.py::test_auto_preconditioner_leaves_short_solves_alone[rosenbrock_extended",
    "tests/test_minimize.py::test_auto_preconditioner_leaves_short_solves_alone[helical_valley",
    "tests/test_minimize.py::test_auto_preconditioner_leaves_short_solves_alone[wood-trust-ncg]",
    "tests/test_minimize.py::test_vmap_over_8_starts_and_jit[newton-cg]",
    "tests/test_minimize_edges.py::test_implicit_gradient_of_a_nonquadratic_problem_matches_unrolled_and_fd[newton-cg]",
    "tests/test_minimize_edges.py::test_escape_from_a_saddle_goes_to_the_boundary_of_the_preconditioner_norm[diagonal]",
    "tests/test_minimize_edges.py::test_n100_saddle_with_few_probe_iterations[float32",
    "tests/test_minimize_edges.py::test_n100_saddle_with_few_probe_iterations[float64-newton-cg]",
    "tests/test_minimize_edges.py::test_zero_curvature_of_a_cubic_is_not_a_success[float32",
    "tests/test_minimize_edges.py::test_zero_curvature_of_a_cubic_is_not_a_success[float64-newton-cg]",
    "tests/test_minimize_edges.py::test_stiff_saddle_is_not_a_success[float32",
    "tests/test_minimize_edges.py::test_stiff_saddle_is_not_a_success[float64-trust-ncg]",
    "tests/test_minimize_edges.py::test_grad_of_solution_wrt_hyperparameter_matches_closed_form[newton-cg]",
    # eigsh: CI keeps one dtype of each, the MLP model and the dense-Hessian checks
    "tests/test_eigsh_edges.py::test_eigsh_on_a_hessian_with_a_repeated_extreme_eigenvalue[LA-float32]",
    "tests/test_eigsh_edges.py::test_eigsh_on_a_hessian_with_a_repeated_extreme_eigenvalue[SA-float64]",
    "tests/test_eigsh_edges.py::test_eigsh_finds_the_multiplicity_of_a_repeated_eigenvalue[LA-expected0-float32]",
    "tests/test_eigsh_edges.py::test_eigsh_finds_the_multiplicity_of_a_repeated_eigenvalue[SA-expected1-float64]",
    "tests/test_eigsh_edges.py::test_eigsh_under_vmap_one_nan_operator_does_not_spoil_the_others[float32]",
    "tests/test_eigsh_edges.py::test_eigsh_refuses_a_non_symmetric_dense_matrix[float32]",
    "tests/test_eigsh_edges.py::test_eigsh_stops_at_once_on_a_nan_operator[float32]",
    "tests/test_eigsh_edges.py::test_grad_through_a_partial_operator",  # and under jit and vmap
    "tests/test_eigsh_models.py::test_eigsh_on_a_cnn_hessian_matches_the_dense_hessian",
    "tests/test_eigsh_models.py::test_loop_product_detects_non_nhwc_convolutions",
    # influence: CI keeps CG, LiSSA and Arnoldi at low rank on dense references
    "tests/test_influence.py::test_mlp_arnoldi_at_low_rank_ranks_like_cg",
    "tests/test_influence.py::test_self_influence_is_minus_the_diagonal",
    "tests/test_influence.py::test_arnoldi_at_full_rank_equals_cg",
    # the spectrum CLI with its figure (test_cli runs the CLI; test_plot the plots)
    "tests/test_plot.py::test_run_spectrum_prints_and_writes_the_figure",
    "tests/test_loop.py::test_rebuilt_operators_give_the_values_of_fresh_dense_references",
    "tests/test_exchangeable.py::test_hessian_of_a_small_mlp_in_float32",
    # hessian_free: CI keeps GGN (eager) and Hessian (jitted) curvature
    "tests/test_optim.py::test_training_decreases_the_loss[True-ggn]",
    "tests/test_optim.py::test_training_decreases_the_loss[False-fisher]",
    "tests/test_optim.py::test_training_decreases_the_loss[False-hessian]",
    "tests/test_optim.py::test_training_decreases_the_loss[True-fisher]",
    # operators and diagonals: CI keeps the categorical likelihood of each
    "tests/test_operators.py::test_out_of_range_traced_targets_make_products_nan[label",
    "tests/test_operators.py::test_out_of_range_traced_targets_make_products_nan[bernoulli",
    "tests/test_operators.py::test_mc_fisher_converges_to_exact[gaussian-mse]",
    "tests/test_operators.py::test_mc_fisher_converges_to_exact[bernoulli-sigmoid_cross_entropy]",
    "tests/test_diagonals.py::test_mc_diagonal_is_the_diagonal_of_the_mc_fisher_with_the_same_key[bernoulli",
    "tests/test_diagonals.py::test_mc_diagonal_is_the_diagonal_of_the_mc_fisher_with_the_same_key[gaussian",
    "tests/test_diagonals.py::test_fisher_diagonal_matches_the_fisher_operator[mc-bernoulli",
    "tests/test_diagonals.py::test_fisher_diagonal_matches_the_fisher_operator[mc-gaussian",
    "tests/test_cg_edges.py::test_singular_psd_never_claims_a_false_success[float32]",
    "tests/test_cg_edges.py::test_norm_gradients[float32]",
    "tests/test_implicit_cg.py::test_pytree_b_with_partial_operator_arrays[float32]",
    "tests/test_per_example.py::test_vhv_every_entry_when_b_is_not_a_multiple_of_chunk_size[3-float32]",
    # remat: CI keeps both remat forms across the modes
    "tests/test_products.py::test_remat_gives_the_same_products[fwd_rev-remat1]",
    "tests/test_products.py::test_remat_gives_the_same_products[rev_rev-True]",
    "tests/test_products.py::test_remat_gives_the_same_products[rev_fwd-remat1]",
    "tests/test_products.py::test_remat_gives_the_same_products[auto-remat1]",
    "tests/test_blocks.py::test_blocks_give_per_layer_top_eigenvalues",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_VARIANTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop compiled programs after each test module: a long-lived xdist worker otherwise holds
    every program the suite compiled (several GB), and XLA:CPU crashed twice in such workers."""
    yield
    jax.clear_caches()
