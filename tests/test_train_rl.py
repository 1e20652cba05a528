"""The default RL run of `rmkernels-train ppo` (critic-free, warm start, task success): the
checker, the pieces of the loop against their formulas, and short end-to-end runs that must
not collapse (the held-out task success must not fall), on CPU."""
import json
import math
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from rmkernels_train import grpo, rl, task
from rmkernels_train.ppo import build_parser, check_args, main

FAST = ["--threads", "1", "--no-progress", "--no-plot"]
# A fall of the held-out task success (300 prompts) larger than this is a collapse: about two
# standard errors of the difference of two success rates near 0.35.
FALL_TOL = 0.05


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    from rmkernels_train.data import SORT_ALPHABET
    from rmkernels_train.tokenizer import build_char_tokenizer

    return build_char_tokenizer(SORT_ALPHABET)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """The default reward model of `rmkernels-train reward`, trained for 200 steps instead of
    500 (~15 s of CPU): it must be a usable judge (held-out accuracy > 0.8; 0.84 here), or the runs below
    test nothing."""
    from rmkernels_train.reward import main as reward_main

    out = tmp_path_factory.mktemp("rm")
    rc = reward_main(["--output-dir", str(out), "--default-train-pairs", "6400", "--threads", "1",
                      "--no-progress", "--no-plot", "--eval-every", "1000"])
    assert rc == 0
    with open(out / "final.json") as f:
        fin = json.load(f)
    assert fin["eval"]["accuracy"] > 0.8, fin["eval"]
    return fin["checkpoint"]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A 3-step, 1-layer reward model (a few seconds): for runs that test messages and options,
    not learning."""
    from rmkernels_train.reward import main as reward_main

    out = tmp_path_factory.mktemp("tiny_rm")
    assert reward_main(["--output-dir", str(out), "--max-steps", "3", "--hidden-size", "16", "--layers", "1",
                        "--default-train-pairs", "64", "--threads", "1", "--no-progress", "--no-plot"]) == 0
    return str(out / "checkpoint-3")


def tiny(rm, out, *extra):
    """A critic-free run of a few seconds (one layer, hidden 16, 2 x 2 responses of 4 tokens)."""
    return ["--reward-model", rm, "--output-dir", str(out), "--warm-start-steps", "0", "--policy-layers", "1",
            "--policy-hidden", "16", "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4",
            "--eval-prompts", "4", "--eval-every", "100", *extra] + FAST


def tiny_gae(rm, out, *extra):
    """The same with --advantage gae (PPO's options instead of the critic-free ones)."""
    return ["--reward-model", rm, "--output-dir", str(out), "--advantage", "gae", "--policy-layers", "1",
            "--policy-hidden", "16", "--batch-size", "2", "--minibatches", "1", "--ppo-epochs", "1",
            "--max-new-tokens", "4", *extra] + FAST


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------
# The task and its checker
# ---------------------------------------------------------------------------------------
def test_checker_accepts_exactly_the_sorted_digits_with_an_eos():
    assert task.answer("sort 4180: ") == "0148"
    assert task.is_correct("sort 4180: ", "0148")
    for wrong in ("0184", "148", "01488", "0148 ", "", "1048"):
        assert not task.is_correct("sort 4180: ", wrong), wrong
    assert not task.is_correct("sort 4180: ", "0148", ended=False)
    with pytest.raises(ValueError, match="not a built-in"):
        task.answer("sort these: ")


def test_heldout_prompts_never_occur_in_training():
    train, held = task.task_prompts()
    assert len(held) == 500 and len(train) > 1000
    assert not set(train) & set(held)


def test_decoder_and_checker_scores(tokenizer):
    dec = task.ResponseDecoder(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def ids(text, end):
        row = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if end else [])
        return row + [pad] * (8 - len(row))

    prompts = ["sort 4180: ", "sort 4180: ", "sort 4180: ", "sort 93: "]
    resp = torch.tensor([ids("0148", True), ids("0148", False), ids("0184", True), ids("39", True)])
    texts, ended = dec(resp)
    assert texts == ["0148", "0148", "0184", "39"] and ended == [True, False, True, True]
    assert task.checker_scores(prompts, resp, dec).tolist() == [1.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------
# The pieces of the loop
# ---------------------------------------------------------------------------------------
def test_unended_responses_get_less_than_the_batch_lowest():
    r = torch.tensor([0.5, -3.0, 2.0, 7.0])
    out = grpo.penalise_unended(r, torch.tensor([True, True, False, True]))
    assert out.tolist() == [0.5, -3.0, -4.0, 7.0]
    assert torch.equal(grpo.penalise_unended(r, torch.ones(4, dtype=torch.bool)), r)


def test_auc_counts_right_over_wrong():
    s = torch.tensor([3.0, 1.0, 2.0, 0.0])
    ok = torch.tensor([True, False, True, False])
    assert grpo.auc(s, ok) == 1.0
    assert grpo.auc(-s, ok) == 0.0
    assert grpo.auc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5
    assert grpo.auc(s, torch.ones(4, dtype=torch.bool)) is None


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_follow_the_spec(estimator):
    """The loop's advantages: rmk.group_advantages of the rewards grouped by prompt, on every
    valid token of the response, 0 after its end."""
    G, n, T = 8, 5, 6
    torch.manual_seed(3)
    scores = torch.randn(n * G) * 3 + 1
    gids = torch.arange(n).repeat_interleave(G)
    lengths = torch.randint(1, T + 1, (n * G,))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    got = grpo.group_advantages(scores, gids, mask, estimator)
    assert got.shape == (n * G, T)
    for g in range(n):
        r = scores[g * G:(g + 1) * G].double()
        if estimator == "grpo":
            want = (r - r.mean()) / (r.std(unbiased=True) + 1e-6)
        elif estimator == "dr_grpo":
            want = r - r.mean()
        else:
            want = (G * r - r.sum()) / (G - 1)
        rows = slice(g * G, (g + 1) * G)
        torch.testing.assert_close(got[rows].double(), want[:, None] * mask[rows], rtol=1e-5, atol=1e-5)


def test_token_rewards_and_reinforce_family_advantages():
    """reinforce_pp / remax in the loop: each response's reward at its last valid token (none for
    a response without one), minus kl_coef x the per-token k1 KL at valid tokens with --kl-mode
    reward; REINFORCE++'s advantages are that return, whitened over every valid token of the batch
    (verl's masked_whiten); ReMax's are the return minus the greedy response's reward."""
    torch.manual_seed(5)
    B, T = 7, 9
    lengths = torch.tensor([9, 1, 0, 4, 9, 6, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    rewards = torch.randn(B)
    tok = grpo.token_rewards(rewards, mask)
    for b in range(B):
        want = torch.zeros(T)
        if lengths[b] > 0:
            want[lengths[b] - 1] = rewards[b]
        torch.testing.assert_close(tok[b], want, rtol=0, atol=0)
    k1 = torch.randn(B, T)
    tok_kl = grpo.token_rewards(rewards, mask, k1, 0.1)
    torch.testing.assert_close(tok_kl, tok - 0.1 * k1 * mask, rtol=1e-6, atol=1e-6)
    adv = grpo.token_advantages(rewards, mask, "reinforce_pp", kl_k1=k1, kl_coef=0.1)
    m = mask.double()
    ret = tok_kl.double().flip(1).cumsum(1).flip(1) * m  # gamma 1, right-padded rows
    mean = (ret * m).sum() / m.sum()
    var = (((ret - mean) ** 2) * m).sum() / (m.sum() - 1)
    torch.testing.assert_close(adv.double(), (ret - mean) * torch.rsqrt(var + 1e-8) * m, rtol=1e-5, atol=1e-5)
    base = torch.randn(B)
    adv = grpo.token_advantages(rewards, mask, "remax", baselines=base)
    want = tok.double().flip(1).cumsum(1).flip(1) - base.double()[:, None] * m
    torch.testing.assert_close(adv.double(), want, rtol=1e-6, atol=1e-6)


def test_fused_logprobs_equal_the_logits_path():
    """The critic-free loop takes the policy's and the reference's log-probs through
    rmk.causal_lm_logprobs (no [B, T, V] logits): the same numbers as log_softmax of the model's
    logits at the response tokens, 0 after the EOS, and the same gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rmkernels_train import ppo_core as core

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64))
    seq = torch.randint(4, 40, (5, 13))
    am = torch.ones(5, 13, dtype=torch.long)
    am[1, 10:] = 0
    am[2, 8:] = 0
    roll = core.Rollout(seq, am, am[:, 6:], 6)
    valid = roll.response_mask.bool()
    ref = core.policy_logprobs(model, roll, 0.9)
    got = core.fused_policy_logprobs(model, roll, 0.9)
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (got[~valid] == 0).all()
    g_ref = torch.autograd.grad((ref * valid).sum(), list(model.parameters()))
    g_got = torch.autograd.grad((got * valid).sum(), list(model.parameters()))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_kl_loss_term_value_and_gradient_are_k3():
    torch.manual_seed(0)
    logp = (torch.randn(4, 6) * 0.3).requires_grad_()
    ref = torch.randn(4, 6) * 0.3
    kl = grpo.kl_per_token(logp, ref, "k3")
    x = ref - logp.detach()
    torch.testing.assert_close(kl.detach(), torch.exp(x) - x - 1)
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref - logp.detach()))


def test_defaults_depend_on_the_estimator():
    a = build_parser().parse_args([])
    check_args(a)
    assert (a.advantage, a.lr, a.kl_coef, a.kl_estimator, a.batch_size, a.num_generations) == \
        ("grpo", 3e-4, 0.5, "k3", 16, 8)
    a = build_parser().parse_args(["--advantage", "gae"])
    check_args(a)
    assert (a.lr, a.kl_coef, a.kl_estimator, a.batch_size, a.steps) == (1e-3, 0.05, "k1", 32, 80)
    a = build_parser().parse_args(["--lr", "1e-4"])
    check_args(a)
    assert a.lr == 1e-4


@pytest.mark.parametrize("argv,message", [
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--eval-prompts", "501"], "--eval-prompts must be <= 500"),  # the held-out prompts (it was capped silently)
    (["--warm-start-steps", "-1"], "--warm-start-steps must be >= 0"),
    (["--kl-estimator", "abs"], "takes k1, k2 or k3"),
    (["--advantage", "gae", "--reward", "checker"], "options of the critic-free run"),
    (["--policy-hidden", "18"], "--policy-hidden must be a multiple of 8"),
    (["--policy-hidden", "18", "--advantage", "gae"], "--policy-hidden must be a multiple of 8"),
    (["--policy-hidden", "12"], "each of an even size for the rotary embedding), got 12"),
    (["--policy-hidden", "4"], "--policy-hidden must be a multiple of 8"),
    (["--kl-clamp", "1e-300", "--advantage", "gae"], "--kl-clamp: kl_clamp must be None or > 0 in float32"),
    (["--score-clip", "1e-46", "--advantage", "gae"], "--score-clip: score_clip must be None or > 0 in float32"),
])
def test_bad_rl_options_stop_with_a_message(argv, message, capsys):
    assert main(argv + FAST) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_together_says_when_score_and_success_part():
    assert "rose together" in rl.together(1.0, 0.2)
    assert "WARNING" in rl.together(1.0, -0.1) and "reward hacking" in rl.together(1.0, -0.1)
    assert "noise" in rl.together(1.0, 0.01) and "WARNING" not in rl.together(1.0, -0.01)
    assert abs(rl.noise(0.3, 0.3, 500) - 2 * (2 * 0.21 / 500) ** 0.5) < 1e-12
    assert "checker" in rl.together(1.0, 0.2, reward="checker")


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------
def _check_run(out, steps, every):
    recs = _records(out / "metrics.jsonl")
    train = [r for r in recs if r["split"] == "train"]
    evals = [r for r in recs if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert [r["step"] for r in evals] == sorted({0, *range(every, steps + 1, every), steps})
    for r in evals:
        for k in ("task_success", "task_success_sampled", "score", "kl", "rm_auc"):
            assert k in r, k
        assert 0 <= r["task_success"] <= 1 and 0 <= r["task_success_sampled"] <= 1
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("score", "kl", "loss", "train_success", "grad_norm"))
    with open(out / "final.json") as f:
        fin = json.load(f)
    assert fin["before"]["task_success"] == evals[0]["task_success"]
    assert fin["after"]["task_success"] == evals[-1]["task_success"]
    return evals, fin


@pytest.mark.slow
def test_short_default_run_does_not_collapse(reward_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--reward-model", reward_model, "--output-dir", str(out), "--steps", "40", "--eval-every", "20",
            "--eval-prompts", "300"] + FAST
    assert main(argv) == 0
    printed = capsys.readouterr()
    evals, fin = _check_run(out, 40, 20)
    before, after = evals[0]["task_success"], evals[-1]["task_success"]
    assert 0.1 < before < 0.7, f"the warm start should be mediocre, solved {before}"
    assert after >= before - FALL_TOL, f"the held-out task success fell: {before} -> {after}"
    assert evals[-1]["kl"] > 0
    assert "Held-out task success (greedy)" in printed.out and f"{before:.3f} -> {after:.3f}" in printed.out
    assert fin["warm_start"]["cached"] is False
    # a run whose output directory holds this warm start (same settings) reuses it: the same
    # policy before RL
    out2 = tmp_path / "again"
    shutil.copytree(out / "warm_start", out2 / "warm_start")
    assert main(["--reward-model", reward_model, "--output-dir", str(out2), "--steps", "1", "--eval-every", "1",
                 "--eval-prompts", "300"] + FAST) == 0
    capsys.readouterr()
    with open(out2 / "final.json") as f:
        again = json.load(f)
    assert again["warm_start"]["cached"] is True and again["before"] == fin["before"]


@pytest.mark.slow
def test_collapse_is_detected(reward_model, tmp_path, capsys):
    """The guard of the test above can fail: a reckless run (lr 1e-2, no KL term) collapses."""
    out = tmp_path / "reckless"
    assert main(["--reward-model", reward_model, "--output-dir", str(out), "--steps", "40", "--eval-every", "40",
                 "--eval-prompts", "300", "--lr", "1e-2", "--kl-coef", "0"] + FAST) == 0
    capsys.readouterr()
    evals, _ = _check_run(out, 40, 40)
    before, after = evals[0]["task_success"], evals[-1]["task_success"]
    assert after < before - FALL_TOL, f"the reckless run did not collapse: {before} -> {after}"


@pytest.mark.slow
def test_checker_reward_control(reward_model, tmp_path, capsys):
    out = tmp_path / "checker"
    assert main(["--reward-model", reward_model, "--output-dir", str(out), "--steps", "40", "--eval-every", "40",
                 "--eval-prompts", "300", "--reward", "checker"] + FAST) == 0
    assert "checker was the reward" in capsys.readouterr().out
    evals, fin = _check_run(out, 40, 40)
    assert fin["reward"] == "checker"
    before, after = evals[0]["task_success_sampled"], evals[-1]["task_success_sampled"]
    assert after >= before - FALL_TOL, f"the sampled task success fell with the checker as reward: {before} -> {after}"


@pytest.mark.parametrize("estimator", ["reinforce_pp", "remax"])
def test_reinforce_family_runs(estimator, reward_model, tmp_path, capsys):
    """--advantage reinforce_pp / remax (one response per prompt allowed) run the loop end to end:
    every train row finite, the evaluations written; with --kl-mode reward for remax (the KL per
    token in the token rewards)."""
    out = tmp_path / estimator
    extra = ["--kl-mode", "reward"] if estimator == "remax" else []
    assert main(["--reward-model", reward_model, "--output-dir", str(out), "--advantage", estimator, "--steps", "2",
                 "--eval-every", "2", "--eval-prompts", "20", "--batch-size", "4", "--num-generations", "1",
                 "--warm-start-steps", "3"] + extra + FAST) == 0
    capsys.readouterr()
    _, fin = _check_run(out, 2, 2)
    assert fin["advantage"] == estimator


def test_custom_prompts_run_with_the_reward_model_and_no_checker(tiny_rm, tmp_path, capsys):
    """--prompts with a critic-free estimator: the checker of the built-in task does not run on
    the file's prompts (train_success is null), whatever the responses (EOS sampled or not)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sort: 3 1 2"}\n{"prompt": "sort: 9 8"}\n')
    out = tmp_path / "run"
    assert main(tiny(tiny_rm, out, "--prompts", str(prompts), "--steps", "2", "--num-generations", "4")) == 0
    _err(capsys)
    train = [r for r in _records(out / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) == 2 and all(r["train_success"] is None for r in train)


def test_rollout_rewards_skip_the_checker_on_custom_prompts(tokenizer, monkeypatch):
    """The responses end with an EOS: the checker would be asked about a prompt it cannot judge."""
    from types import SimpleNamespace

    eos = tokenizer.eos_token_id
    seq = torch.tensor([[tokenizer.bos_token_id, 5, 6, eos, eos]] * 2)
    roll = SimpleNamespace(sequences=seq, prompt_len=3)
    monkeypatch.setattr(grpo, "rm_scores", lambda model, r, tokenizer, backend=None: torch.zeros(2))
    rewards, _, correct, has_eos = grpo.rollout_rewards(roll, ["sort: 3 1 2"] * 2, "model", None, tokenizer,
                                                        task.ResponseDecoder(tokenizer), check=False)
    assert correct is None and bool(has_eos.all()) and rewards.tolist() == [0.0, 0.0]


def test_policy_with_a_smaller_vocabulary_stops_with_a_message(tiny_rm, tmp_path, capsys):
    """One check for both paths: a --policy whose embedding table cannot hold the tokenizer's ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pol = tmp_path / "pol"
    LlamaForCausalLM(LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(pol)
    for run in (tiny, tiny_gae):
        argv = run(tiny_rm, tmp_path / run.__name__, "--policy", str(pol), "--steps", "1")
        for opt in ("--policy-layers", "--policy-hidden"):  # refused with --policy
            i = argv.index(opt)
            del argv[i:i + 2]
        assert main(argv) == 1
        assert "its vocabulary (5 token embeddings) is smaller than the tokenizer's (" in _err(capsys)


@pytest.fixture(scope="module")
def warm_run(tiny_rm, tmp_path_factory):
    """A 2-step run from a 2-step warm start: <out>/warm_start and checkpoint-2."""
    out = tmp_path_factory.mktemp("warm") / "run"
    assert main(tiny(tiny_rm, out, "--steps", "2", "--warm-start-steps", "2")) == 0
    return out


def _damage_cache(ws, case):
    if case == "truncated model":
        with open(ws / "model.safetensors", "r+b") as f:
            f.truncate(100)
    elif case == "missing model":
        (ws / "model.safetensors").unlink()
    else:
        (ws / "warm_start.json").write_text({"malformed json": "{\"settings\": ", "not an object": "[1, 2]",
                                             "missing json": None}[case] or "")
        if case == "missing json":
            (ws / "warm_start.json").unlink()


@pytest.mark.parametrize("case", ["truncated model", "missing model", "malformed json", "not an object",
                                  "missing json"])
def test_damaged_warm_start_cache_is_trained_again(warm_run, tiny_rm, tmp_path, capsys, case):
    out = tmp_path / "run"
    shutil.copytree(warm_run / "warm_start", out / "warm_start")
    _damage_cache(out / "warm_start", case)
    (out / ".tmp-warm_start-x1").mkdir()  # left by a killed warm-start write
    assert main(tiny(tiny_rm, out, "--steps", "1", "--warm-start-steps", "2")) == 0
    err = _err(capsys)
    assert "training it again" in err and "removed .tmp-warm_start-x1" in err
    assert not (out / ".tmp-warm_start-x1").exists()
    with open(out / "final.json") as f:
        assert json.load(f)["warm_start"]["cached"] is False
    # the cache was rewritten whole: the next run loads it
    shutil.rmtree(out / "checkpoint-1")
    assert main(tiny(tiny_rm, out, "--steps", "1", "--warm-start-steps", "2")) == 0
    _err(capsys)
    with open(out / "final.json") as f:
        assert json.load(f)["warm_start"]["cached"] is True


def test_resume_does_not_read_the_warm_start_cache(warm_run, tiny_rm, tmp_path, capsys):
    """The checkpoint holds the policy and the reference: a damaged cache is not even read."""
    out = tmp_path / "run"
    shutil.copytree(warm_run, out)
    _damage_cache(out / "warm_start", "truncated model")
    assert main(tiny(tiny_rm, out, "--steps", "3", "--warm-start-steps", "2", "--resume")) == 0
    err = _err(capsys)
    assert "resuming from" in err and "training it again" not in err
    train = [r for r in _records(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]


# Each option of one path alone, given to the other (they were accepted and ignored).
GAE_ONLY = [k for k in rl.GAE_DEFAULTS if k not in rl.CRITIC_FREE_DEFAULTS]
CRITIC_FREE_ONLY = [k for k in rl.CRITIC_FREE_DEFAULTS if k not in rl.GAE_DEFAULTS]
FLAG_ONLY = ("adaptive_kl", "whiten", "shift_mean", "unbiased")
VALUES = {"reward": "model", "kl_mode": "loss"}


def _given(dest):
    return [rl.flag(dest)] + ([] if dest in FLAG_ONLY else [VALUES.get(dest, "1")])


@pytest.mark.parametrize("dest", GAE_ONLY)
def test_ppo_options_are_refused_by_the_critic_free_run(dest, capsys):
    assert set(GAE_ONLY) >= {"value_lr", "vf_coef", "clip_range_value", "gamma", "lam", "adaptive_kl", "kl_clamp",
                             "score_clip", "whiten", "shift_mean", "unbiased", "missing_eos_penalty"}
    assert main(_given(dest) + FAST) == 1
    assert f"{rl.flag(dest)}: options of --advantage gae" in _err(capsys)


@pytest.mark.parametrize("dest", CRITIC_FREE_ONLY)
def test_critic_free_options_are_refused_by_gae(dest, capsys):
    assert set(CRITIC_FREE_ONLY) >= {"num_generations", "warm_start_steps", "eval_every", "eval_prompts"}
    assert main(["--advantage", "gae"] + _given(dest) + FAST) == 1
    assert f"{rl.flag(dest)}: options of the critic-free run" in _err(capsys)


def test_the_update_options_belong_to_both_paths():
    """--ppo-epochs and --minibatches have a default on each path (one table each), --clip-range,
    --clip-range-high (default: --clip-range) and --loss-agg one for both; none is refused."""
    assert {"ppo_epochs", "minibatches"} <= set(rl.CRITIC_FREE_DEFAULTS) & set(rl.GAE_DEFAULTS)
    for argv, want in [([], (1, 1, 0.2, 0.2, "token-mean")),
                       (["--advantage", "gae"], (4, 2, 0.2, 0.2, "token-mean")),
                       (["--clip-range", "0.3"], (1, 1, 0.3, 0.3, "token-mean")),
                       (["--advantage", "gae", "--clip-range-high", "0.28", "--loss-agg", "seq-mean-token-sum"],
                        (4, 2, 0.2, 0.28, "seq-mean-token-sum")),
                       (["--ppo-epochs", "2", "--minibatches", "4", "--clip-range-high", "0.28", "--loss-agg",
                         "seq-mean-token-mean"], (2, 4, 0.2, 0.28, "seq-mean-token-mean"))]:
        a = build_parser().parse_args(argv)
        check_args(a)
        assert (a.ppo_epochs, a.minibatches, a.clip_range, a.clip_range_high, a.loss_agg) == want, argv
    for advantage in ("grpo", "gae"):
        assert {"ppo_epochs", "minibatches", "clip_range", "clip_range_high", "clip_ratio_c", "loss_agg",
                "entropy_coef"} <= \
            set(rl.resume_fixed(advantage))
    # --clip-ratio-c (dual-clip): off unless given, on both paths
    for argv, want in [([], None), (["--advantage", "gae"], None), (["--clip-ratio-c", "3"], 3.0),
                       (["--advantage", "gae", "--clip-ratio-c", "1.5"], 1.5)]:
        a = build_parser().parse_args(argv)
        check_args(a)
        assert a.clip_ratio_c == want, argv


@pytest.mark.parametrize("argv,message", [
    (["--minibatches", "3"], "--minibatches 3: the 128 responses of each step (16 prompts x --num-generations 8) "
                             "do not split into 3 equal minibatches"),
    (["--minibatches", "0"], "--minibatches must be > 0"),
    (["--ppo-epochs", "0"], "--ppo-epochs must be > 0"),
    (["--clip-range-high", "0"], "--clip-range-high must be a finite number > 0"),
    (["--clip-range-high", "nan", "--advantage", "gae"], "--clip-range-high must be a finite number > 0"),
    (["--entropy-coef", "-0.01"], "--entropy-coef must be a finite number >= 0"),
    (["--entropy-coef", "inf", "--advantage", "gae"], "--entropy-coef must be a finite number >= 0"),
    (["--clip-ratio-c", "1"], "--clip-ratio-c must be a finite number > 1"),
    (["--clip-ratio-c", "0.5"], "--clip-ratio-c must be a finite number > 1"),
    (["--clip-ratio-c", "-3", "--advantage", "gae"], "--clip-ratio-c must be a finite number > 1"),
    (["--clip-ratio-c", "nan", "--advantage", "gae"], "--clip-ratio-c must be a finite number > 1"),
    (["--clip-ratio-c", "inf"], "--clip-ratio-c must be a finite number > 1"),
])
def test_bad_update_options_stop_with_a_message(argv, message, capsys):
    assert main(argv + FAST) == 1
    assert message in _err(capsys)
    with pytest.raises(SystemExit):  # argparse's usage and one line
        main(["--loss-agg", "seq-sum"])
    assert "argument --loss-agg: invalid choice: 'seq-sum'" in _err(capsys)


def test_minibatches_must_split_the_responses_of_a_short_prompt_file(tiny_rm, tmp_path, capsys):
    """--batch-size 5 x 2 responses split into 5 minibatches, but a 2-prompt file makes 4 a step."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sort 31: "}\n{"prompt": "sort 98: "}\n')
    assert main(tiny(tiny_rm, tmp_path / "run", "--prompts", str(prompts), "--steps", "1", "--batch-size", "5",
                     "--minibatches", "5")) == 1
    assert ("--minibatches 5: the 4 responses of each step (2 prompts x --num-generations 2) do not split into 5 "
            "equal minibatches") in _err(capsys)


def test_several_updates_train_and_resume_exactly(tiny_rm, tmp_path, capsys):
    """A short run with --ppo-epochs 2 --minibatches 2 (and clip-higher, seq-mean-token-mean):
    4 updates a step, finite losses, the clip fraction > 0 once the policy has moved; stopped
    after one step and resumed, it ends with the metrics and weights of the uninterrupted run."""
    from safetensors.torch import load_file

    opts = ("--ppo-epochs", "2", "--minibatches", "2", "--lr", "1e-2", "--clip-range", "0.1", "--clip-range-high",
            "0.15", "--loss-agg", "seq-mean-token-mean", "--save-every", "100")
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert main(tiny(tiny_rm, a, "--steps", "3", *opts)) == 0
    assert main(tiny(tiny_rm, b, "--steps", "3", "--stop-after", "1", *opts)) == 0
    assert main(tiny(tiny_rm, b, "--steps", "3", "--resume", *opts)) == 0
    _err(capsys)
    ta = [r for r in _records(a / "metrics.jsonl") if r["split"] == "train"]
    tb = [r for r in _records(b / "metrics.jsonl") if r["split"] == "train"]
    assert [r["updates"] for r in ta] == [4, 4, 4]
    assert all(math.isfinite(r[k]) for r in ta for k in ("loss", "pg_loss", "clipfrac", "policy_kl"))
    assert max(r["clipfrac"] for r in ta) > 0 and ta[0]["policy_kl"] > 0
    for x, y in zip(ta, tb):
        assert {k: v for k, v in x.items() if k != "time"} == {k: v for k, v in y.items() if k != "time"}
    wa = load_file(a / "checkpoint-3" / "policy" / "model.safetensors")
    wb = load_file(b / "checkpoint-3" / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name,canonical", [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3"), ("k2", "k2")])
def test_kl_estimator_aliases_are_taken_by_the_critic_free_run(name, canonical):
    a = build_parser().parse_args(["--kl-estimator", name])
    check_args(a)
    assert a.kl_estimator == canonical


def test_kl_estimator_is_refused_with_kl_mode_reward(capsys):
    assert main(["--kl-mode", "reward", "--kl-estimator", "k3"] + FAST) == 1
    assert "with --kl-mode reward the critic-free run subtracts the k1 KL" in _err(capsys)


def test_critic_free_batch_size_1_and_a_kl_alias_run(tiny_rm, tmp_path, capsys):
    """--batch-size 1 (not GAE's --minibatches <= --batch-size: the critic-free minibatches split the
    responses) and --kl-estimator mse; the checkpoint records GAE's own options as None."""
    out = tmp_path / "run"
    assert main(tiny(tiny_rm, out, "--steps", "1", "--batch-size", "1", "--kl-estimator", "mse")) == 0
    _err(capsys)
    with open(out / "checkpoint-1" / "trainer_state.json") as f:
        args = json.load(f)["args"]
    assert args["kl_estimator"] == "k2" and args["value_lr"] is None and args["ppo_epochs"] == 1


def test_kl_mode_reward_logs_the_k1_it_applies(tokenizer, monkeypatch):
    """With --kl-mode reward the step's kl metric is the k1 subtracted from the rewards, not the
    loss estimator's (k3 here, the resolved default): with a policy that differs from the
    reference, k1 and k3 differ."""
    from transformers import LlamaForCausalLM

    from rmkernels_train import sft

    torch.manual_seed(0)
    policy = sft.build_policy(tokenizer, layers=1, hidden=16)
    ref = sft.build_policy(tokenizer, layers=1, hidden=16)
    ref.requires_grad_(False)
    assert isinstance(policy, LlamaForCausalLM)
    monkeypatch.setattr(grpo, "rm_scores", lambda model, r, tokenizer, backend=None: torch.zeros(r.sequences.shape[0]))
    ids = [[tokenizer.bos_token_id] + tokenizer("sort 312: ", add_special_tokens=False)["input_ids"]] * 2
    kls = {}
    for mode in ("reward", "loss"):
        torch.manual_seed(1)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        r = grpo.rl_step(policy, ref, None, opt, tokenizer, ["sort 312: "] * 2, ids, num_generations=2,
                         estimator="grpo", reward="model", kl_coef=0.1, kl_estimator="k3", kl_mode=mode,
                         max_new_tokens=4, temperature=1.0, max_grad_norm=1.0)
        kls[mode] = r["kl"]
    torch.manual_seed(1)
    roll = grpo.sample(policy, [i for i in ids for _ in range(2)], tokenizer, max_new_tokens=4)
    from rmkernels_train import ppo_core as core

    with torch.no_grad():
        k1 = ((core.fused_policy_logprobs(policy, roll, 1.0) - core.fused_policy_logprobs(ref, roll, 1.0))
              * roll.response_mask).sum(1).mean().item()
    assert kls["reward"] == pytest.approx(k1, rel=1e-4, abs=1e-6)
    assert kls["loss"] != pytest.approx(k1, rel=1e-3)


# ---------------------------------------------------------------------------------------
# Several updates per rollout batch, --clip-range-high, --loss-agg
# ---------------------------------------------------------------------------------------
def _fake_scores(model, roll, tokenizer, backend=None):
    """A stand-in reward model: a fixed function of each response's tokens (groups disagree)."""
    resp = roll.sequences[:, roll.prompt_len:].float() * roll.response_mask
    return (resp * torch.arange(1, resp.shape[1] + 1)).sum(1) % 7 - 3.0


def _tiny_step_setup(tokenizer, seed=0):
    from rmkernels_train import sft

    torch.manual_seed(seed)
    policy = sft.build_policy(tokenizer, layers=1, hidden=16)
    ref = sft.build_policy(tokenizer, layers=1, hidden=16)
    ref.load_state_dict(policy.state_dict())
    with torch.no_grad():  # a reference that differs from the policy: a KL term with a gradient
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.requires_grad_(False)
    prompts = ["sort 312: ", "sort 9071: ", "sort 55: "]
    ids = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return policy, ref, prompts, ids


def _old_rl_step(policy, ref, optimizer, tokenizer, prompts, prompt_ids, *, num_generations, estimator, kl_coef,
                 kl_estimator, kl_mode, max_new_tokens, temperature, max_grad_norm):
    """The critic-free step before --ppo-epochs / --minibatches / --loss-agg (commit 6667218's
    grpo.rl_step, reward "model", group and token estimators but not remax): one on-policy step,
    the token-mean losses."""
    from rmkernels_train import ppo_core as core

    G = num_generations
    rep_ids = [p for p in prompt_ids for _ in range(G)]
    roll = grpo.sample(policy, rep_ids, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature)
    mask = roll.response_mask
    group_ids = torch.arange(len(prompts), device=mask.device).repeat_interleave(G)
    with torch.no_grad():
        ref_logp = core.fused_policy_logprobs(ref, roll, temperature)
        has_eos = grpo.ended(roll, tokenizer.eos_token_id)
        rewards = grpo.penalise_unended(grpo.rm_scores(None, roll, tokenizer), has_eos)
    logp = core.fused_policy_logprobs(policy, roll, temperature)
    kl_tok = grpo.kl_per_token(logp, ref_logp, kl_estimator)
    k1_tok = (logp.detach() - ref_logp) * mask if kl_mode == "reward" else None
    seq_kl = (kl_tok.detach() * mask).sum(1) if k1_tok is None else k1_tok.sum(1)
    seq_rewards = rewards if k1_tok is None else rewards - kl_coef * k1_tok.sum(1)
    if estimator in grpo.TOKEN_ESTIMATORS:
        tok_adv = grpo.token_advantages(rewards, mask, estimator, kl_k1=k1_tok, kl_coef=kl_coef)
    else:
        tok_adv = grpo.group_advantages(seq_rewards, group_ids, mask, estimator)
    pg_loss, _, _ = core.ppo_policy_loss(logp, logp.detach(), tok_adv, mask, 1.0)
    loss = pg_loss
    if kl_mode == "loss" and kl_coef > 0:
        loss = loss + kl_coef * core.masked_mean(kl_tok, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    return {"reward": seq_rewards.mean().item(), "kl": seq_kl.mean().item(), "loss": loss.item(),
            "pg_loss": pg_loss.item(), "grad_norm": float(grad_norm)}


STEP = dict(num_generations=4, kl_coef=0.3, kl_estimator="k3", max_new_tokens=5, temperature=1.0,
            max_grad_norm=0.5)


@pytest.mark.parametrize("estimator,kl_mode", [("grpo", "loss"), ("rloo", "reward"), ("reinforce_pp", "loss")])
def test_default_step_is_the_one_on_policy_step_of_before(tokenizer, monkeypatch, estimator, kl_mode):
    """With the defaults (1 epoch, 1 minibatch, token-mean) rl_step computes what it computed
    before the options existed, bit for bit: the metrics, the gradient step (two AdamW steps:
    the parameters and the optimizer state), and the torch RNG it leaves behind."""
    monkeypatch.setattr(grpo, "rm_scores", _fake_scores)
    runs = {}
    for which in ("old", "new"):
        policy, ref, prompts, ids = _tiny_step_setup(tokenizer)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
        recs = []
        for step in range(2):
            torch.manual_seed(100 + step)
            if which == "old":
                recs.append(_old_rl_step(policy, ref, opt, tokenizer, prompts, ids, estimator=estimator,
                                         kl_mode=kl_mode, **STEP))
            else:
                recs.append(grpo.rl_step(policy, ref, None, opt, tokenizer, prompts, ids, estimator=estimator,
                                         reward="model", kl_mode=kl_mode, check=False, **STEP))
            recs[-1]["rng"] = torch.rand(1).item()
        runs[which] = (recs, {k: v.clone() for k, v in policy.state_dict().items()}, opt.state_dict())
    (old, w_old, o_old), (new, w_new, o_new) = runs["old"], runs["new"]
    for a, b in zip(old, new):
        assert {k: b[k] for k in a} == a
        assert b["updates"] == 1 and b["clipfrac"] == 0.0 and b["policy_kl"] == 0.0
    assert old[0]["loss"] != old[1]["loss"]
    for k in w_old:
        assert torch.equal(w_old[k], w_new[k]), k
    for i, st in o_old["state"].items():
        assert all(torch.equal(st[k], o_new["state"][i][k]) for k in st)


def test_more_updates_per_batch_clip_against_the_rollout_policy(tokenizer, monkeypatch):
    """--ppo-epochs 2 --minibatches 2: 4 optimizer steps on the one batch; with lr 0 the policy
    never moves, every ratio is 1 (the log-probs of the rollout are recomputed exactly: nothing
    clipped, policy_kl 0); with a large lr it moves and the later updates clip. The minibatch
    permutations come from the generator given: the same generator seed, the same step."""
    monkeypatch.setattr(grpo, "rm_scores", _fake_scores)
    out = {}
    for lr, gseed in ((0.0, 0), (5e-2, 0), (5e-2, 0), (5e-2, 1)):
        policy, ref, prompts, ids = _tiny_step_setup(tokenizer)
        opt = torch.optim.Adam(policy.parameters(), lr=lr)
        torch.manual_seed(7)
        r = grpo.rl_step(policy, ref, None, opt, tokenizer, prompts, ids, estimator="grpo", reward="model",
                         kl_mode="loss", check=False, ppo_epochs=2, minibatches=2, clip_range=0.1,
                         generator=torch.Generator().manual_seed(gseed), **STEP)
        out.setdefault((lr, gseed), []).append((r, [p.detach().clone() for p in policy.parameters()]))
    r0 = out[(0.0, 0)][0][0]
    assert r0["updates"] == 4 and r0["clipfrac"] == 0.0 and r0["policy_kl"] == 0.0
    (r1, w1), (r2, w2) = out[(5e-2, 0)]
    assert r1["updates"] == 4 and r1["clipfrac"] > 0 and r1["policy_kl"] > 0
    assert r1 == {**r2, "time": r1["time"]} and all(torch.equal(a, b) for a, b in zip(w1, w2))
    r3, w3 = out[(5e-2, 1)][0]
    assert r3["loss"] != r1["loss"] and not all(torch.equal(a, b) for a, b in zip(w1, w3))
    with pytest.raises(ValueError, match="minibatches"):
        grpo.rl_step(policy, ref, None, opt, tokenizer, prompts, ids, estimator="grpo", reward="model",
                     kl_mode="loss", check=False, minibatches=5, **STEP)


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_agg_aggregates_the_policy_and_kl_losses(tokenizer, monkeypatch, loss_agg):
    """--loss-agg reaches the step's loss: its pg_loss and loss are those of ppo_core.agg_loss of
    the token losses (horizon --max-new-tokens), not the token mean."""
    from rmkernels_train import ppo_core as core

    monkeypatch.setattr(grpo, "rm_scores", _fake_scores)
    seen = []
    real = core.agg_loss

    def spy(loss_mat, mask, mode="token-mean", horizon=None, dp=None):
        seen.append((mode, horizon, dp))
        return real(loss_mat, mask, mode, horizon, dp)

    monkeypatch.setattr(core, "agg_loss", spy)
    res = {}
    for mode in ("token-mean", loss_agg):
        policy, ref, prompts, ids = _tiny_step_setup(tokenizer)
        torch.manual_seed(3)
        res[mode] = grpo.rl_step(policy, ref, None, torch.optim.SGD(policy.parameters(), lr=0.0), tokenizer,
                                 prompts, ids, estimator="grpo", reward="model", kl_mode="loss", check=False,
                                 loss_agg=mode, **STEP)
    assert seen[-2:] == [(loss_agg, STEP["max_new_tokens"], None)] * 2  # the policy loss, then the KL term
    assert res[loss_agg]["pg_loss"] != res["token-mean"]["pg_loss"]
    assert res[loss_agg]["loss"] - res[loss_agg]["pg_loss"] != pytest.approx(
        res["token-mean"]["loss"] - res["token-mean"]["pg_loss"], rel=1e-6)


def test_dual_clip_reaches_the_critic_free_loss(tokenizer, monkeypatch):
    """clip_ratio_c reaches every update's policy loss; with it the step logs clipfrac_lower (> 0
    once the policy has moved: a bound just above 1 binds) and trains otherwise; without it the
    step has no such key. A bound <= 1 is refused before anything is sampled."""
    from rmkernels_train import ppo_core as core

    monkeypatch.setattr(grpo, "rm_scores", _fake_scores)
    seen, real = [], core.ppo_policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("clip_ratio_c"))
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "ppo_policy_loss", spy)
    out = {}
    for c in (None, 1.05):
        policy, ref, prompts, ids = _tiny_step_setup(tokenizer)
        torch.manual_seed(7)
        out[c] = grpo.rl_step(policy, ref, None, torch.optim.Adam(policy.parameters(), lr=5e-2), tokenizer,
                              prompts, ids, estimator="grpo", reward="model", kl_mode="loss", check=False,
                              ppo_epochs=2, minibatches=2, clip_range=0.1, clip_ratio_c=c,
                              generator=torch.Generator().manual_seed(0), **STEP)
    assert seen == [None] * 4 + [1.05] * 4
    assert "clipfrac_lower" not in out[None] and 0 < out[1.05]["clipfrac_lower"] <= 1
    assert out[1.05]["loss"] != out[None]["loss"]
    for c in (1.0, float("nan")):
        torch.manual_seed(7)
        with pytest.raises(ValueError, match="clip_ratio_c must be a finite number > 1"):
            grpo.rl_step(policy, ref, None, torch.optim.SGD(policy.parameters(), lr=0.0), tokenizer, prompts, ids,
                         estimator="grpo", reward="model", kl_mode="loss", check=False, clip_ratio_c=c, **STEP)
    assert len(seen) == 8


def test_dual_clip_run_resumes_exactly_and_fixes_the_option(tiny_rm, tmp_path, capsys):
    """A critic-free run with --clip-ratio-c logs clipfrac_lower every step and records the option
    in its checkpoint; stopped and resumed with it, it ends where the straight run ends; resumed
    without it (or with another value), it is refused, naming the option."""
    from safetensors.torch import load_file

    opts = ("--ppo-epochs", "2", "--minibatches", "2", "--lr", "1e-2", "--clip-range", "0.1", "--save-every", "100")
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert main(tiny(tiny_rm, a, "--steps", "2", "--clip-ratio-c", "2", *opts)) == 0
    assert main(tiny(tiny_rm, b, "--steps", "2", "--stop-after", "1", "--clip-ratio-c", "2", *opts)) == 0
    with open(b / "checkpoint-1" / "trainer_state.json") as f:
        assert json.load(f)["args"]["clip_ratio_c"] == 2.0
    _err(capsys)
    assert main(tiny(tiny_rm, b, "--steps", "2", "--resume", *opts)) == 1
    assert "--clip-ratio-c was 2.0 in the checkpoint's run and is None now" in _err(capsys)
    assert main(tiny(tiny_rm, b, "--steps", "2", "--resume", "--clip-ratio-c", "3", *opts)) == 1
    assert "--clip-ratio-c was 2.0 in the checkpoint's run and is 3.0 now" in _err(capsys)
    assert main(tiny(tiny_rm, b, "--steps", "2", "--resume", "--clip-ratio-c", "2", *opts)) == 0
    _err(capsys)
    ta = [r for r in _records(a / "metrics.jsonl") if r["split"] == "train"]
    tb = [r for r in _records(b / "metrics.jsonl") if r["split"] == "train"]
    assert len(ta) == 2 and all(0 <= r["clipfrac_lower"] <= 1 for r in ta)
    for x, y in zip(ta, tb):
        assert {k: v for k, v in x.items() if k != "time"} == {k: v for k, v in y.items() if k != "time"}
    wa = load_file(a / "checkpoint-2" / "policy" / "model.safetensors")
    wb = load_file(b / "checkpoint-2" / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def gae_run(tiny_rm, tmp_path_factory):
    """A 1-step --advantage gae run: checkpoint-1."""
    out = tmp_path_factory.mktemp("gae") / "run"
    assert main(tiny_gae(tiny_rm, out, "--steps", "1")) == 0
    return out


@pytest.mark.parametrize("run,argv,message", [
    ("critic_free", ["--advantage", "gae"], "--advantage was 'grpo' in the checkpoint's run and is 'gae' now"),
    ("critic_free", ["--policy-hidden", "32"], "--policy-hidden was 16 in the checkpoint's run and is 32 now"),
    ("critic_free", ["--policy-layers", "2"], "--policy-layers was 1 in the checkpoint's run and is 2 now"),
    ("gae", ["--advantage", "grpo"], "--advantage was 'gae' in the checkpoint's run and is 'grpo' now"),
    ("gae", ["--policy-hidden", "32"], "--policy-hidden was 16 in the checkpoint's run and is 32 now"),
    ("gae", ["--kl-coef", "0.3"], "--kl-coef was 0.05 in the checkpoint's run and is 0.3 now"),
    ("gae", ["--lr", "0.1"], "--lr was 0.001 in the checkpoint's run and is 0.1 now"),
    ("gae", ["--kl-estimator", "k3"], "--kl-estimator was 'k1' in the checkpoint's run and is 'k3' now"),
    ("gae", ["--gamma", "0.5"], "--gamma was 1.0 in the checkpoint's run and is 0.5 now"),
    ("critic_free", ["--loss-agg", "seq-mean-token-mean"],
     "--loss-agg was 'token-mean' in the checkpoint's run and is 'seq-mean-token-mean' now"),
    ("critic_free", ["--ppo-epochs", "2"], "--ppo-epochs was 1 in the checkpoint's run and is 2 now"),
    ("critic_free", ["--minibatches", "2"], "--minibatches was 1 in the checkpoint's run and is 2 now"),
    ("critic_free", ["--clip-range-high", "0.3"], "--clip-range-high was 0.2 in the checkpoint's run and is 0.3 now"),
    ("gae", ["--loss-agg", "seq-mean-token-sum-norm"],
     "--loss-agg was 'token-mean' in the checkpoint's run and is 'seq-mean-token-sum-norm' now"),
    ("gae", ["--ppo-epochs", "2"], "--ppo-epochs was 1 in the checkpoint's run and is 2 now"),
    ("gae", ["--clip-range-high", "0.3"], "--clip-range-high was 0.2 in the checkpoint's run and is 0.3 now"),
    ("critic_free", ["--entropy-coef", "0.01"], "--entropy-coef was 0.0 in the checkpoint's run and is 0.01 now"),
    ("gae", ["--entropy-coef", "0.01"], "--entropy-coef was 0.0 in the checkpoint's run and is 0.01 now"),
    ("critic_free", ["--clip-ratio-c", "3"], "--clip-ratio-c was None in the checkpoint's run and is 3.0 now"),
    ("gae", ["--clip-ratio-c", "3"], "--clip-ratio-c was None in the checkpoint's run and is 3.0 now"),
    ("critic_free", ["--max-grad-norm", "0.5"], "--max-grad-norm was 1.0 in the checkpoint's run and is 0.5 now"),
    ("gae", ["--max-grad-norm", "0.5"], "--max-grad-norm was 1.0 in the checkpoint's run and is 0.5 now"),
])
def test_resume_names_the_option_that_changed(warm_run, gae_run, tiny_rm, tmp_path, capsys, run, argv, message):
    """The checkpoint's options are compared before any weight is loaded: a changed option is
    named, and no intact checkpoint is reported as damaged (a user could delete good ones)."""
    out = tmp_path / "run"
    shutil.copytree(warm_run if run == "critic_free" else gae_run, out)
    base = {"critic_free": lambda: tiny(tiny_rm, out, "--warm-start-steps", "2", "--steps", "3", "--resume"),
            "gae": lambda: tiny_gae(tiny_rm, out, "--steps", "3", "--resume")}
    a = base[run]()
    if "--advantage" in argv:  # the other path's own command line
        a = (tiny_gae(tiny_rm, out, "--steps", "3", "--resume") if run == "critic_free"
             else tiny(tiny_rm, out, "--steps", "3", "--resume"))
    else:
        a += argv
    assert main(a) == 1
    err = _err(capsys)
    assert message in err and "skipping" not in err and "not intact" not in err, err


def _as_older_checkpoint(out, advantage):
    """Make the checkpoints' trainer_state.json as the version before --clip-range-high,
    --clip-ratio-c and --loss-agg wrote them (a critic-free run also stored None for PPO's update
    options)."""
    for p in out.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(p.read_text())
        for k in ("clip_range_high", "clip_ratio_c", "loss_agg", "entropy_coef"):
            del state["args"][k]
        if advantage != "gae":
            state["args"].update(ppo_epochs=None, minibatches=None, clip_range=None)
        p.write_text(json.dumps(state))


@pytest.mark.parametrize("run", ["critic_free", "gae"])
def test_an_older_checkpoint_resumes_at_the_defaults(warm_run, gae_run, tiny_rm, tmp_path, capsys, run):
    """A checkpoint without the new options resumes with them at the values its run had (one
    on-policy update for the critic-free run, the clip at --clip-range on both sides, no
    dual-clip, token-mean), and refuses others, naming the value its run had."""
    out = tmp_path / "run"
    shutil.copytree(warm_run if run == "critic_free" else gae_run, out)
    _as_older_checkpoint(out, "grpo" if run == "critic_free" else "gae")
    argv = (tiny(tiny_rm, out, "--warm-start-steps", "2", "--steps", "3", "--resume") if run == "critic_free"
            else tiny_gae(tiny_rm, out, "--steps", "3", "--resume"))
    assert main(argv + ["--loss-agg", "seq-mean-token-sum"]) == 1
    assert "--loss-agg was 'token-mean' in the checkpoint's run and is 'seq-mean-token-sum' now" in _err(capsys)
    assert main(argv + ["--clip-range-high", "0.25"]) == 1
    assert "--clip-range-high was 0.2 in the checkpoint's run and is 0.25 now" in _err(capsys)
    assert main(argv + ["--entropy-coef", "0.1"]) == 1
    assert "--entropy-coef was 0.0 in the checkpoint's run and is 0.1 now" in _err(capsys)
    assert main(argv + ["--clip-ratio-c", "3"]) == 1
    assert "--clip-ratio-c was None in the checkpoint's run and is 3.0 now" in _err(capsys)
    if run == "critic_free":
        assert main(argv + ["--ppo-epochs", "2"]) == 1
        assert "--ppo-epochs was 1 in the checkpoint's run and is 2 now" in _err(capsys)
    assert main(argv) == 0
    assert "resuming from" in _err(capsys)


def test_default_reward_model_is_found_from_another_working_directory(tiny_rm, tmp_path, capsys, monkeypatch):
    """reward_model/final.json records the checkpoint relative to the directory the reward run
    ran in ("sim/reward_model/checkpoint-3"): a run started elsewhere finds it in its
    <output-dir>/reward_model."""
    out = tmp_path / "sim"
    shutil.copytree(tiny_rm, out / "reward_model" / "checkpoint-3")
    (out / "reward_model" / "final.json").write_text(json.dumps({"checkpoint": "sim/reward_model/checkpoint-3"}))
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    argv = tiny(tiny_rm, out, "--steps", "1")
    argv = argv[2:]  # no --reward-model
    assert main(argv) == 0
    _err(capsys)
    with open(out / "final.json") as f:
        assert json.load(f)["reward_model"] == str(out / "reward_model" / "checkpoint-3")


def test_damaged_checkpoint_message_names_the_file(warm_run, tiny_rm, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(warm_run, out)
    with open(out / "checkpoint-2" / "ref_policy" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert main(tiny(tiny_rm, out, "--warm-start-steps", "2", "--steps", "3", "--resume")) == 1
    assert "checkpoint-2: ref_policy/model.safetensors is damaged" in _err(capsys)


@pytest.mark.parametrize("file", ["trainer_state.json", "policy/model.safetensors", "optimizer.pt"])
def test_checkpoint_file_without_permission_stops_instead_of_being_skipped(warm_run, tiny_rm, tmp_path, capsys,
                                                                           monkeypatch, file):
    """A file that cannot be read for lack of permission is not damage: skipping the checkpoint
    would resume from an older one and later overwrite this intact one."""
    import builtins

    out = tmp_path / "run"
    shutil.copytree(warm_run, out)
    denied = str(out / "checkpoint-2" / file)
    real = builtins.open

    def fake(path, *a, **kw):
        if str(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake)
    assert main(tiny(tiny_rm, out, "--warm-start-steps", "2", "--steps", "3", "--resume")) == 1
    err = _err(capsys)
    assert f"--resume: cannot read {denied} (Permission denied)" in err and "skipping" not in err
    assert (out / "checkpoint-2").is_dir()


def test_batch_size_above_the_prompt_count_is_warned(tiny_rm, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sort 31: "}\n{"prompt": "sort 98: "}\n')
    assert main(tiny(tiny_rm, tmp_path / "run", "--prompts", str(prompts), "--steps", "1", "--batch-size", "5")) == 0
    assert (f"warning: --batch-size 5 is more than the 2 prompts of {prompts}: each step uses all 2 prompts once"
            in _err(capsys))


# ---------------------------------------------------------------------------------------
# --entropy-coef: the entropy bonus (verl's entropy_coeff)
# ---------------------------------------------------------------------------------------
def test_response_entropy_is_the_entropy_of_the_softmax(tokenizer):
    """ppo_core.response_logprobs' entropy against float64 -sum p log p, -inf logits included
    (p = 0 adds 0), and the fused path (rmk.causal_lm_logprobs) against the logits path."""
    from rmkernels_train import ppo_core as core

    g = torch.Generator().manual_seed(3)
    B, P, R, V = 3, 2, 5, 11
    logits = torch.randn(B, P + R, V, generator=g) * 3
    logits[0, P, 4] = float("-inf")
    seqs = torch.randint(0, V, (B, P + R), generator=g)
    seqs[0, P + 1] = 7
    for temperature in (1.0, 0.7):
        logp, ent = core.response_logprobs(logits, seqs, P, temperature, return_entropy=True)
        ref = torch.log_softmax(logits[:, P - 1:-1].double() / temperature, -1)
        want = -(ref.exp() * torch.where(ref.isinf(), 0.0, ref)).sum(-1)
        torch.testing.assert_close(ent.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logp, core.response_logprobs(logits, seqs, P, temperature))
        assert torch.isfinite(ent).all()
    policy, _, _, ids = _tiny_step_setup(tokenizer)
    torch.manual_seed(0)
    roll = grpo.sample(policy, ids, tokenizer, max_new_tokens=6, temperature=1.0)
    lp_f, ent_f = core.fused_policy_logprobs(policy, roll, 0.8, return_entropy=True)
    lp_l, ent_l = core.policy_logprobs(policy, roll, 0.8, return_entropy=True)
    m = roll.response_mask.bool()
    torch.testing.assert_close(lp_f[m], lp_l[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_f[m], ent_l[m], rtol=1e-5, atol=1e-5)
    assert (ent_f[~m] == 0).all() and (ent_f[m] > 0).all()


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_entropy_coef_adds_minus_coef_times_the_entropy_to_the_loss(tokenizer, monkeypatch, loss_agg):
    """rl_step with --entropy-coef c against the same step with 0 (same rollouts): the loss is
    lower by c times the aggregated entropy of the rollout policy, and with plain SGD (lr 1, no
    clipping) the parameters differ by c times that entropy's gradient (the sign that raises the
    entropy); the token-mean entropy is logged."""
    from rmkernels_train import ppo_core as core

    monkeypatch.setattr(grpo, "rm_scores", _fake_scores)
    c = 0.5
    step = {**STEP, "max_grad_norm": 1e9}
    runs = {}
    for coef in (0.0, c):
        policy, ref, prompts, ids = _tiny_step_setup(tokenizer)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        torch.manual_seed(100)
        rec = grpo.rl_step(policy, ref, None, opt, tokenizer, prompts, ids, estimator="grpo", reward="model",
                           kl_mode="loss", check=False, loss_agg=loss_agg, entropy_coef=coef, **step)
        runs[coef] = rec, {k: v.detach().clone() for k, v in policy.state_dict().items()}
    # the rollout of that step, and the entropy's gradient at the starting policy
    policy, _, prompts, ids = _tiny_step_setup(tokenizer)
    torch.manual_seed(100)
    roll = grpo.sample(policy, [p for p in ids for _ in range(STEP["num_generations"])], tokenizer,
                       max_new_tokens=STEP["max_new_tokens"], temperature=1.0)
    _, ent = core.fused_policy_logprobs(policy, roll, 1.0, return_entropy=True)
    agg = core.agg_loss(ent, roll.response_mask, loss_agg, STEP["max_new_tokens"])
    grads = torch.autograd.grad(agg, [p for p in policy.parameters()], allow_unused=True)
    (r0, w0), (rc, wc) = runs[0.0], runs[c]
    assert "entropy" not in r0
    assert rc["entropy"] == pytest.approx(core.masked_mean(ent, roll.response_mask).item(), rel=1e-5)
    assert rc["pg_loss"] == pytest.approx(r0["pg_loss"], rel=1e-6, abs=1e-7)
    assert rc["loss"] - r0["loss"] == pytest.approx(-c * agg.item(), rel=1e-4, abs=1e-6)
    moved = 0
    for (name, p), gr in zip(policy.named_parameters(), grads):
        want = torch.zeros_like(p) if gr is None else c * gr
        torch.testing.assert_close(wc[name] - w0[name], want, rtol=1e-3, atol=1e-6)
        moved += int(gr is not None and gr.abs().max() > 1e-6)
    assert moved > 0


def test_gae_update_takes_the_entropy_bonus(tiny_rm, tmp_path, capsys, monkeypatch):
    """--advantage gae --entropy-coef: every minibatch's loss gets ppo_core.entropy_bonus of the
    policy's entropy (its mask, --loss-agg, --max-new-tokens), and the step logs its entropy; a
    default run logs none."""
    from rmkernels_train import ppo_core as core

    calls = []
    real = core.entropy_bonus

    def spy(entropy, mask, coef, loss_agg, horizon, dp):
        calls.append((entropy.shape == mask.shape, entropy.requires_grad, coef, loss_agg, horizon, dp))
        return real(entropy, mask, coef, loss_agg, horizon, dp)

    monkeypatch.setattr(core, "entropy_bonus", spy)
    assert main(tiny_gae(tiny_rm, tmp_path / "e", "--steps", "2", "--entropy-coef", "0.05", "--loss-agg",
                         "seq-mean-token-sum")) == 0
    assert calls == [(True, True, 0.05, "seq-mean-token-sum", 4, None)] * 2  # one process: no dp
    recs = [r for r in _records(tmp_path / "e" / "metrics.jsonl") if r.get("split") == "train"]
    assert len(recs) == 2 and all(0 < r["entropy"] < math.log(len(tokenizer_vocab(tiny_rm))) + 1e-6 for r in recs)
    assert main(tiny_gae(tiny_rm, tmp_path / "d", "--steps", "1")) == 0
    assert all("entropy" not in r for r in _records(tmp_path / "d" / "metrics.jsonl"))
    _err(capsys)


def tokenizer_vocab(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint).get_vocab()


@pytest.mark.parametrize("path", ["critic_free", "gae"])
def test_dual_clip_and_entropy_bonus_together(tiny_rm, tmp_path, capsys, path):
    """--clip-ratio-c and --entropy-coef in one run, on each path: both metrics logged, finite."""
    make = tiny if path == "critic_free" else tiny_gae
    assert main(make(tiny_rm, tmp_path / "run", "--steps", "2", "--clip-ratio-c", "3", "--entropy-coef", "0.01")) == 0
    recs = [r for r in _records(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "train"]
    assert len(recs) == 2
    for r in recs:
        assert 0.0 <= r["clipfrac_lower"] <= 1.0 and r["entropy"] > 0 and math.isfinite(r["pg_loss"]), r
    _err(capsys)


# ---------------------------------------------------------------------------------------
# Resume: non-finite weights, metrics.jsonl lines of the wrong shape
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cf_run(tiny_rm, tmp_path_factory):
    """A 2-step critic-free run with checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("cf") / "run"
    assert main(tiny(tiny_rm, out, "--steps", "2", "--save-every", "1", "--save-total-limit", "3")) == 0
    return out


def _poison(path, name, value=float("nan")):
    from safetensors.torch import load_file, save_file

    t = load_file(path)
    t[name][0] = value
    save_file(t, path, metadata={"format": "pt"})


@pytest.mark.parametrize("file", ["policy/model.safetensors", "ref_policy/model.safetensors"])
def test_resume_skips_a_checkpoint_of_non_finite_weights(cf_run, tiny_rm, tmp_path, capsys, file):
    """A checkpoint whose policy (or reference) holds NaN / inf is damaged: skipped for the
    older intact one (it was taken as intact: sampling from it crashed in torch.multinomial)."""
    out = tmp_path / "run"
    shutil.copytree(cf_run, out)
    _poison(out / "checkpoint-2" / file, "lm_head.weight", float("nan") if "ref" not in file else float("inf"))
    assert main(tiny(tiny_rm, out, "--steps", "3", "--save-every", "1", "--save-total-limit", "3", "--resume")) == 0
    err = _err(capsys)
    assert f"--resume: skipping checkpoint-2: {file} holds non-finite values (lm_head.weight has NaN or inf)" in err
    assert f"resuming from {out / 'checkpoint-1'} (step 1)" in err


def test_a_reward_model_of_non_finite_weights_stops_with_one_line(tiny_rm, tmp_path, capsys):
    rm = tmp_path / "rm"
    shutil.copytree(tiny_rm, rm)
    _poison(rm / "model.safetensors", "score.weight")
    for run in (tiny, tiny_gae):
        assert main(run(str(rm), tmp_path / run.__name__, "--steps", "1")) == 1
        line = _err(capsys).strip().splitlines()[-1]
        assert line == (f"rmkernels-train ppo: error: --reward-model {rm}: its weights are not finite (score.weight "
                        f"has NaN or inf)"), line


def test_resume_skips_metrics_lines_of_the_wrong_shape(cf_run, tiny_rm, tmp_path, capsys):
    """Well-formed lines of the wrong types (a text step, an eval row without its numbers) are
    dropped like a line cut short, not a TypeError / KeyError."""
    out = tmp_path / "run"
    shutil.copytree(cf_run, out)
    kept = (out / "metrics.jsonl").read_text()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": null}\n{"step": "1", "split": "eval"}\n{"step": 2, "split": "eval", "kl": 0.1}\n'
                '{"step": 1, "split": 3}\n')
    assert main(tiny(tiny_rm, out, "--steps", "3", "--save-every", "1", "--save-total-limit", "3", "--resume")) == 0
    _err(capsys)
    rows = _records(out / "metrics.jsonl")
    assert rows[:len(kept.splitlines())] == [json.loads(x) for x in kept.splitlines()]
    assert [(r["split"], r["step"]) for r in rows[len(kept.splitlines()):]] == [("train", 3), ("eval", 3)]
    final = json.loads((out / "final.json").read_text())
    assert final["before"]["step"] == 0 and final["after"]["step"] == 3
    # every eval row unusable: the run evaluates again where it resumes, and goes on
    (out / "metrics.jsonl").write_text('{"step": 0, "split": "eval", "score": "x"}\n')
    assert main(tiny(tiny_rm, out, "--steps", "4", "--save-every", "1", "--save-total-limit", "3", "--resume")) == 0
    _err(capsys)
    assert [(r["split"], r["step"]) for r in _records(out / "metrics.jsonl")] == [("eval", 3), ("train", 4),
                                                                                   ("eval", 4)]


def test_resume_past_steps_says_so(cf_run, tiny_rm, tmp_path, capsys):
    """--resume with a smaller --steps than the checkpoint's: "nothing to train" on both paths, as
    the reward trainer says (the last line said "2 steps" as if the run had done them)."""
    out = tmp_path / "cf"
    shutil.copytree(cf_run, out)
    assert main(tiny(tiny_rm, out, "--steps", "1", "--save-every", "1", "--save-total-limit", "3", "--resume")) == 0
    captured = capsys.readouterr()
    assert "nothing to train: the checkpoint is at step 2, past the 1 steps this run asks for (--steps)" in \
        captured.out + captured.err
    gae = tmp_path / "gae"
    assert main(tiny_gae(tiny_rm, gae, "--steps", "2")) == 0
    _err(capsys)
    assert main(tiny_gae(tiny_rm, gae, "--steps", "1", "--resume")) == 0
    captured = capsys.readouterr()
    assert "nothing to train: the checkpoint is at step 2, past the 1 steps this run asks for (--steps)" in \
        captured.out + captured.err


# ---------------------------------------------------------------------------------------
# Under torchrun (data parallel)
# ---------------------------------------------------------------------------------------
def _torchrun(argv, cwd):
    import subprocess
    import sys

    from utils import subprocess_env

    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rmkernels_train", "ppo", *map(str, argv)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_train_critic_free_and_resume_exactly(tiny_rm, tmp_path):
    """`torchrun --nproc_per_node 2 -m rmkernels_train ppo --advantage grpo`: rank 0 trains the
    warm start and the other rank starts from its weights; the ranks end with identical
    parameters; every evaluation covers all --eval-prompts (split over the ranks); stopped after
    2 steps and resumed, the run ends with the metrics and weights of the uninterrupted one."""
    from safetensors.torch import load_file

    opts = ("--steps", "4", "--save-every", "2", "--eval-every", "2", "--eval-prompts", "5",
            "--warm-start-steps", "3")
    a, b = tmp_path / "straight", tmp_path / "resumed"
    proc = _torchrun(tiny(tiny_rm, a, *opts), tmp_path)
    assert "2 processes, parameters identical on every rank" in proc.stdout, proc.stdout[-2000:]
    _torchrun(tiny(tiny_rm, b, "--stop-after", "2", *opts), tmp_path)
    proc = _torchrun(tiny(tiny_rm, b, "--resume", *opts), tmp_path)
    assert "resuming from" in proc.stderr and "skipping" not in proc.stderr, proc.stderr[-2000:]
    ra, rb = _records(a / "metrics.jsonl"), _records(b / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in ra] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2),
                                                     ("train", 3), ("train", 4), ("eval", 4)]
    assert all(r["prompts"] == 5 for r in ra if r["split"] == "eval")
    assert all(r["updates"] == 1 and math.isfinite(r["loss"]) for r in ra if r["split"] == "train")
    for x, y in zip(ra, rb, strict=True):
        assert {k: v for k, v in x.items() if k != "time"} == {k: v for k, v in y.items() if k != "time"}
    with open(a / "final.json") as f:
        fin = json.load(f)
    assert fin["world_size"] == 2 and fin["warm_start"]["cached"] is False and fin["steps"] == 4
    wa = load_file(a / "policy" / "model.safetensors")
    wb = load_file(b / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_processes_need_a_batch_of_prompts_each(tiny_rm, tmp_path):
    """Each rank takes --batch-size different prompts a step: 2 x 2 from a 3-prompt file stops
    both ranks with one line (no traceback, no hang) before any training."""
    from utils import assert_one_line_each, run_two_ranks

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "sort {n}: "}}\n' for n in (31, 98, 527)))
    out = tmp_path / "o"
    ranks = run_two_ranks(["ppo", *tiny(tiny_rm, out, "--prompts", prompts, "--steps", "1")], tmp_path)
    line = (f"--batch-size 2 x 2 processes is more than the 3 prompts of {prompts}: each step gives every "
            f"process --batch-size different prompts (lower --batch-size)")
    assert_one_line_each(ranks, "rmkernels-train ppo", [line, line])
    assert not out.exists()  # a run that stopped at its start leaves no output directory


@pytest.mark.parametrize("fault,name", [("metrics-write:2:ENOSPC", "metrics.jsonl"),
                                        ("final-write:1:ENOSPC", "final.json")])
def test_a_failed_write_of_rank_0_stops_both_critic_free_ranks_with_one_line(tiny_rm, tmp_path, fault, name):
    """A disk full while rank 0 alone writes metrics.jsonl (its second line: the step-1 record) or
    final.json: rank 0 stops with the line naming it, rank 1 with the same line prefixed "rank 0: "
    (no hang, no traceback)."""
    from utils import assert_one_line_each, run_two_ranks

    out = tmp_path / "o"
    ranks = run_two_ranks(["ppo", *tiny(tiny_rm, out, "--steps", "2")], tmp_path,
                          {"RMKERNELS_TRAIN_FAULT": fault, "RMKERNELS_TRAIN_FAULT_RANK": "0"})
    line = f"cannot write {out / name} (No space left on device)"
    assert_one_line_each(ranks, "rmkernels-train ppo", [line, f"rank 0: {line}"])


def test_a_one_process_checkpoint_resumed_on_two_stops_with_one_line(tiny_rm, tmp_path, capsys):
    """--resume under torchrun of a one-process run's checkpoint: the number of processes is
    fixed on resume (each rank's sampling and share of the prompts depend on it); both ranks
    stop with the same one line, said once (not "rank 0: ...; rank 1: ..." of the same line)."""
    from utils import assert_one_line_each, run_two_ranks

    out = tmp_path / "o"
    assert main(tiny(tiny_rm, out, "--steps", "2", "--stop-after", "1")) == 0
    _err(capsys)
    ranks = run_two_ranks(["ppo", *tiny(tiny_rm, out, "--steps", "2", "--resume")], tmp_path)
    line = ("--resume: the number of processes (torchrun's ranks) was 1 in the checkpoint's run and is 2 now (these "
            "options must stay the same on --resume: they decide what each step sees, or the model and its "
            "optimizer; use another --output-dir to change them)")
    assert_one_line_each(ranks, "rmkernels-train ppo", [line, line])


@pytest.mark.parametrize("damage", ["missing weight", "nan weight"])
def test_a_damaged_warm_start_cache_is_trained_again(tiny_rm, tmp_path, capsys, damage):
    """A warm-start cache whose weights file lost a tensor (from_pretrained initialised it
    randomly, the run went on with `cached: true`) or holds NaN (the run stopped: "training
    diverged") is damaged: trained again, saying why."""
    from safetensors.torch import load_file, save_file

    def argv(out):
        return tiny(tiny_rm, out, "--steps", "1")[:-len(FAST)] + FAST + ["--warm-start-steps", "2"]

    first = tmp_path / "first"
    assert main(argv(first)) == 0
    capsys.readouterr()
    out = tmp_path / "again"
    shutil.copytree(first / "warm_start", out / "warm_start")
    path = out / "warm_start" / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if "down_proj" in k)
    if damage == "missing weight":
        del tensors[name]
        why = f"model.safetensors does not fit the model (missing ['{name}']"
    else:
        tensors[name].view(-1)[0] = float("nan")
        why = f"model.safetensors holds non-finite values ({name} has NaN or inf)"
    save_file(tensors, path, metadata={"format": "pt"})
    assert main(argv(out)) == 0
    err = capsys.readouterr().err
    assert f"{out / 'warm_start'}: its model is damaged ({why}" in err and "training it again" in err, err
    with open(out / "final.json") as f:
        assert json.load(f)["warm_start"]["cached"] is False
    assert torch.isfinite(load_file(path)[name]).all() and name in load_file(path)


def test_reward_run_whose_final_checkpoint_is_gone(tiny_rm, tmp_path, capsys):
    """--reward-model a reward run's output directory whose final.json names a checkpoint that
    was deleted: the message blamed a tokenizer ("Repo id must be in the form ..."); now it
    says the checkpoint is not there."""
    run = tmp_path / "rm"
    shutil.copytree(os.path.dirname(tiny_rm), run)
    shutil.rmtree(run / os.path.basename(tiny_rm))
    summary = json.loads((run / "final.json").read_text())
    (run / "final.json").write_text(json.dumps({**summary, "checkpoint": str(run / os.path.basename(tiny_rm))}))
    rc = main(tiny(str(run), tmp_path / "o", "--steps", "1"))
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert (f"--reward-model {run}: a training output directory; its summary {run / 'final.json'} names the final "
            f"checkpoint {run / os.path.basename(tiny_rm)}, which is not there") in err, err


def test_prompts_the_tokenizer_does_not_know_are_warned(tiny_rm, tmp_path, capsys):
    """--prompts with characters outside the reward model's vocabulary trained on <unk> tokens
    without a word; now a warning counts them and names the first."""
    prompts = tmp_path / "p.jsonl"
    rows = ["sort 0312: "] * 6 + ["日本語", "sort 21日: "]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    rc = main(tiny(tiny_rm, tmp_path / "o", "--steps", "1", "--prompts", str(prompts)))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (f"warning: 2 of 8 prompts hold text the tokenizer does not know (read as <unk>; the first: "
            f"{prompts}:7)") in err, err
