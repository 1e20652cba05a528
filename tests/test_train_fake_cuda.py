"""``rmkernels-train reward`` and ``rmkernels-train ppo`` with ``--device cuda``, here, on the
stand-in GPU of tests/fake_cuda.py (rmkernels' reference backend in place of its kernels):
every tensor the loops make must be on the GPU when the model's are. Short runs; what they
learn is tested on the CPU elsewhere.

Found this way, before any GPU ran the loops: the critic-free step built its group ids on the
CPU, and the checker's 0/1 rewards came back on the CPU, so ``rmk.group_advantages`` stopped
the default RL run (``--advantage grpo``) at its first step on a GPU.
"""
import json

import fake_cuda
import pytest
import torch

from rmkernels_train.ppo import main as ppo_main
from rmkernels_train.reward import main as reward_main

pytest.importorskip("transformers")

FAST = ["--threads", "1", "--no-progress", "--no-plot", "--device", "cuda"]


@pytest.fixture
def gpu():
    with fake_cuda.gpu():
        yield


def _final(out):
    with open(out / "final.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A reward model trained for 2 steps on the stand-in, resumed for 2 more: the PPO runs
    below load it. (Not ``--packing``: its 500 held-out pairs take ~2 minutes on the stand-in,
    which dispatches every op twice.)"""
    out = tmp_path_factory.mktemp("rm")
    with fake_cuda.gpu():
        args = ["--output-dir", str(out), "--default-train-pairs", "64", "--eval-every", "100"] + FAST
        assert reward_main(args + ["--max-steps", "2"]) == 0
        assert reward_main(args + ["--max-steps", "4", "--resume"]) == 0
    fin = _final(out)
    assert fin["checkpoint"].endswith("checkpoint-4"), fin["checkpoint"]
    return fin["checkpoint"]


@pytest.mark.parametrize("extra,resume", [
    (["--advantage", "grpo", "--kl-mode", "reward"], True),
    (["--advantage", "dr_grpo", "--reward", "checker"], False),
    (["--advantage", "remax", "--num-generations", "2", "--kl-mode", "loss"], False),
    (["--advantage", "reinforce_pp", "--num-generations", "1", "--reward", "checker"], False),
    (["--advantage", "rloo", "--ppo-epochs", "2", "--minibatches", "2", "--clip-range-high", "0.28", "--loss-agg",
      "seq-mean-token-mean"], False),
    (["--advantage", "gae", "--adaptive-kl", "--ppo-epochs", "2", "--minibatches", "2"], True),
], ids=lambda e: "-".join(a.lstrip("-") for a in e) if isinstance(e, list) else ("resume" if e else "1-step"))
def test_ppo_on_a_gpu(extra, resume, reward_model, gpu, tmp_path, capsys):
    """One RL step (critic-free: with task evaluations before and after it) and, with
    ``resume``, a second step resumed from the first one's checkpoint."""
    out = tmp_path / "ppo"
    critic_free = [] if "gae" in extra else ["--eval-every", "1", "--eval-prompts", "4", "--warm-start-steps", "2"]
    args = ["--reward-model", reward_model, "--output-dir", str(out), "--batch-size", "2"] + critic_free + extra + FAST
    assert ppo_main(args + ["--steps", "1"]) == 0, capsys.readouterr().err
    steps = 1
    if resume:
        steps = 2
        assert ppo_main(args + ["--steps", "2", "--resume"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1)), rows
    if "gae" not in extra:  # the critic-free loop's task evaluations, before and after each step
        assert {r["step"] for r in rows if r.get("split") == "eval"} >= set(range(steps + 1)), rows


def test_checker_scores_follow_the_responses_device(gpu):
    from rmkernels_train.data import SORT_ALPHABET
    from rmkernels_train.task import ResponseDecoder, checker_scores
    from rmkernels_train.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(SORT_ALPHABET)
    right = tok.encode("12", add_special_tokens=False) + [tok.eos_token_id]
    wrong = tok.encode("21", add_special_tokens=False) + [tok.eos_token_id]
    ids = torch.tensor([right, wrong], device="cuda")
    out = checker_scores(["sort 21: "] * 2, ids, ResponseDecoder(tok))
    assert out.device == ids.device and out.tolist() == [1.0, 0.0]


@pytest.mark.triton
@pytest.mark.parametrize("extra", [["--advantage", "grpo", "--kl-mode", "reward"],
                                   ["--advantage", "reinforce_pp", "--num-generations", "1"],
                                   ["--advantage", "gae"]], ids=lambda e: e[1])
def test_ppo_on_a_gpu_with_triton(extra, reward_model, tmp_path, capsys):
    """The loop with ``--backend triton`` (what a GPU without the CUDA build runs): the Triton
    host code inside training (fused log-probs, advantages, KL), kernels in the interpreter,
    launches refusing CPU tensors."""
    fake_cuda.require_interpreter()
    out = tmp_path / "ppo"
    with fake_cuda.gpu(triton=True):
        critic_free = [] if "gae" in extra else ["--eval-every", "1", "--eval-prompts", "4", "--warm-start-steps", "2"]
        rc = ppo_main(["--reward-model", reward_model, "--output-dir", str(out), "--batch-size", "2", "--steps", "1",
                       "--backend", "triton"] + critic_free + extra + FAST)
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if '"train"' in line] == [1]
