"""DPO: each loss type against a hand computation, and a toy run that learns the preferences."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from finetune.data import DataConfig, preference_dataset
from finetune.formats import tokenize_preference
from finetune.lora import LoraConfig, apply_lora
from finetune.losses import DPOConfig, dpo_loss
from finetune.trainer import TrainConfig, Trainer
from ft_helpers import tiny

# Fixed summed log-probs for three pairs: policy chosen/rejected, reference chosen/rejected, completion lengths.
PC, PR = [-12.0, -20.5, -7.25], [-15.0, -18.0, -9.0]
RC, RR = [-13.0, -19.0, -8.0], [-14.0, -19.5, -8.5]
LC, LR = [4, 6, 3], [5, 6, 2]


def _logsig(x):
    return -math.log1p(math.exp(-x))


def _hand(loss_type, beta, eps):
    out = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        if loss_type == "ipo":
            h = (pc - rc) / lc - (pr - rr) / lr
            out.append((h - 1 / (2 * beta)) ** 2)
            continue
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h))
        elif loss_type == "robust":
            out.append((-(1 - eps) * _logsig(beta * h) + eps * _logsig(-beta * h)) / (1 - 2 * eps))
        else:
            out.append(max(0.0, 1 - beta * h))
    return out


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.3, 0.0),
                                                 ("hinge", 0.4, 0.0), ("robust", 0.2, 0.1)])
def test_dpo_loss_matches_hand_computation(loss_type, beta, eps):
    cfg = DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=eps)
    arr = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    losses, metrics = dpo_loss(arr(PC), arr(PR), arr(RC), arr(RR), cfg, arr(LC), arr(LR))
    np.testing.assert_allclose(np.asarray(losses), _hand(loss_type, beta, eps), rtol=1e-5, atol=1e-6)
    chosen = [beta * (p - r) for p, r in zip(PC, RC)]
    rejected = [beta * (p - r) for p, r in zip(PR, RR)]
    np.testing.assert_allclose(np.asarray(metrics["rewards/chosen"]), chosen, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["rewards/margins"]), np.subtract(chosen, rejected), rtol=1e-5)
    assert np.asarray(metrics["rewards/accuracies"]).tolist() == [float(c > r) for c, r in zip(chosen, rejected)]


def test_dpo_config_validation():
    with pytest.raises(ValueError, match="loss_type='kto'"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing=0.1 applies"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1)


def _pairs(tok):
    return [tokenize_preference({"prompt": f"Q{k}:", "chosen": f" yes{k}", "rejected": f" no{k}"}, tok)
            for k in range(8)]


def test_dpo_run_learns_preferences_and_precompute_agrees():
    model, tok = tiny("tiny-llama")
    apply_lora(model, LoraConfig(r=8, alpha=16))
    trainer = Trainer(model, TrainConfig(method="dpo", max_steps=12, learning_rate=2e-2, compute_dtype="float32",
                                         lr_schedule="constant", dpo=DPOConfig(beta=0.5)))
    cfg = DataConfig(seq_len=16, batch_size=8, shuffle=False, num_epochs=None)
    pairs = _pairs(tok)
    eval_batch = next(iter(preference_dataset(pairs, DataConfig(seq_len=16, batch_size=8, shuffle=False))))
    before = trainer.evaluate([eval_batch])
    assert before["eval_rewards/accuracies"] == 0.0  # the policy is the reference: every margin is exactly 0
    assert before["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)

    # Reference log-probs precomputed in one pass give the same first-step loss as the in-step reference.
    chosen, rejected = trainer.reference_logps(eval_batch)
    extra = {"ref_chosen_logps": chosen.reshape(-1), "ref_rejected_logps": rejected.reshape(-1)}
    with_ref = next(iter(preference_dataset(pairs, cfg, extra=extra)))
    assert trainer.evaluate([with_ref])["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)

    it = iter(preference_dataset(pairs, cfg))
    for _ in range(12):
        trainer.train_step(next(it))
    after = trainer.evaluate([eval_batch])
    assert after["eval_rewards/accuracies"] >= 0.9, after
    assert after["eval_rewards/margins"] > 0 and after["eval_loss"] < before["eval_loss"]
