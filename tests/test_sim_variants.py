"""``sim.variant: paper | released_code`` and the validation of the sim params section."""
from __future__ import annotations

import pytest

from sim_core.errors import InputError
from sim_core.sim.variants import PAPER, boxinst_config, resolve_sim_settings


def test_paper_defaults():
    s = resolve_sim_settings({})
    assert (s.alpha, s.num_prototypes, s.tau, s.mu) == (0.5, 10, 1.0, 5.0)
    assert (s.lambda_pseudo, s.lambda_paste, s.ema_momentum, s.proto_momentum) == (0.5, 1.0, 0.9999, 0.999)
    assert (s.confident_thresh, s.sinkhorn_eps, s.sinkhorn_iters) == (0.7, 0.05, 3)
    assert (s.bank_size, s.paste_prob, s.paste_fraction) == (100, 0.5, 0.25)
    assert s.pseudo_start_frac == pytest.approx(1 / 9)
    assert (s.tau_high, s.tau_low, s.pseudo_loss_kind, s.pseudo_ramp) == (0.7, 0.4, "bce_dice", "step")


def test_released_code_differs_exactly_where_listed():
    paper = resolve_sim_settings({"variant": "paper"}).as_dict()
    released = resolve_sim_settings({"variant": "released_code"}).as_dict()
    diff = {k: released[k] for k in paper if paper[k] != released[k]}
    assert diff == {
        "variant": "released_code",
        "mu": 0.0,  # plain mean over the positives
        "lambda_pseudo": 0.3,
        "pseudo_loss_kind": "focal",
        "pseudo_ramp": "linear",  # gated at 10000, then 0.3 * iter / 270000 (fractions of 1x)
        "pseudo_ramp_span": 3.0,
        "paste_when_full": True,
        "tau_high_mode": "adaptive",  # per GT, clamped to [0.7, 0.8]
        "outside_box_weight": 0.0,
        "bank_size": 50,
        "paste_fraction": 0.5,
        "paste_score_power": 3.0,
        "pairwise_color_thresh": 0.1,
        "pairwise_feature_similarity": True,
    }
    assert (released["tau_high"], released["tau_high_max"], released["tau_low"]) == (0.7, 0.8, 0.4)
    # same gate as the paper's warm-up, and no temperature in either
    assert released["pseudo_start_frac"] == pytest.approx(10000 / 90000) and released["tau"] == 1.0


def test_params_listing_paper_values_still_switch_with_the_variant():
    full = {k: v for k, v in PAPER.items()}
    full["variant"] = "released_code"
    assert resolve_sim_settings(full).mu == 0.0
    # keys the variant does not govern stay free
    assert resolve_sim_settings({"variant": "released_code", "alpha": 0.3, "num_prototypes": 5}).alpha == 0.3


def test_contradictions_and_bad_values_are_input_errors():
    with pytest.raises(InputError, match="tau"):
        resolve_sim_settings({"variant": "released_code", "tau": 0.3})
    with pytest.raises(InputError, match="pseudo_ramp_span"):
        resolve_sim_settings({"variant": "released_code", "pseudo_ramp_span": 2.0})
    with pytest.raises(InputError, match="pseudo_ramp_span"):
        resolve_sim_settings({"pseudo_ramp_span": 0.0})
    assert resolve_sim_settings({"tau": 0.1}).tau == 0.1  # the temperature stays a setting
    with pytest.raises(InputError, match="unknown key 'alhpa'"):
        resolve_sim_settings({"alhpa": 0.5})
    with pytest.raises(InputError, match="variant"):
        resolve_sim_settings({"variant": "official"})
    assert resolve_sim_settings({"variant": "released_code", "paste_dice_mean": "sampled"}).paste_dice_mean == "sampled"
    with pytest.raises(InputError, match="paste_dice_mean"):
        resolve_sim_settings({"paste_dice_mean": "all"})
    assert resolve_sim_settings({"variant": "released_code"}).teacher_init == "student"  # a free switch
    assert resolve_sim_settings({"teacher_init": "independent"}).teacher_init == "independent"
    with pytest.raises(InputError, match="teacher_init"):
        resolve_sim_settings({"teacher_init": "random"})
    assert resolve_sim_settings({"variant": "released_code"}).teacher_head_input == "teacher"  # a free switch
    with pytest.raises(InputError, match="teacher_head_input"):
        resolve_sim_settings({"teacher_head_input": "ema"})
    with pytest.raises(InputError, match="alpha"):
        resolve_sim_settings({"alpha": 1.5})
    with pytest.raises(InputError, match="num_prototypes"):
        resolve_sim_settings({"num_prototypes": 0})
    with pytest.raises(InputError, match="num_prototypes"):
        resolve_sim_settings({"num_prototypes": 2.5})
    with pytest.raises(InputError, match="tau_low"):
        resolve_sim_settings({"tau_low": 0.8})
    with pytest.raises(InputError, match="copy_paste"):
        resolve_sim_settings({"copy_paste": "yes"})
    with pytest.raises(InputError, match="pseudo_loss needs"):
        resolve_sim_settings({"prototypes": False, "self_correction": False})
    assert resolve_sim_settings({"prototypes": False, "self_correction": False, "pseudo_loss": False}).copy_paste


def test_boxinst_section_as_sim_runs_it():
    cfg = {"pairwise_color_thresh": 0.3, "pairwise_warmup_frac": 0.2}
    assert boxinst_config(resolve_sim_settings({}), cfg) == cfg
    released = boxinst_config(resolve_sim_settings({"variant": "released_code"}), cfg)
    assert released == {"pairwise_color_thresh": 0.1, "pairwise_warmup_frac": 0.2}
    # passthrough keys of the trainer are accepted
    assert resolve_sim_settings({"boxinst": cfg, "mask_feat_channels": 16}).variant == "paper"
