"""The default-model recipe's own pieces: VAE widening keeps the function, budgeted runs resume."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "default_model"))
from budget import BudgetedRun  # noqa: E402
from train_vae import build_vae, widen  # noqa: E402


@torch.no_grad()
def test_widening_the_vae_keeps_latents_and_reconstructions():
    torch.manual_seed(0)
    vae = build_vae(width=4).eval()
    for p in vae.parameters():  # zero-initialised layers would hide a wrong mapping
        p.add_(torch.randn_like(p) * 0.1)
    wide = widen(vae, 2).eval()
    assert wide.config.block_out_channels == [8, 16, 32] and wide.config.norm_num_groups == 8
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in vae.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    a, b = vae.encode(x).latent_dist, wide.encode(x).latent_dist
    torch.testing.assert_close(b.mean, a.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.std, a.std, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wide.decode(a.mean).sample, vae.decode(a.mean).sample, atol=1e-4, rtol=1e-4)
    # the copies of a channel are read with different weights, else they would get equal gradients forever
    w = wide.decoder.conv_out.weight
    half = w.shape[1] // 2
    assert (w[:, :half] - w[:, half:]).abs().max() > 1e-3


def test_budgeted_run_resumes_step_weights_and_learning_rate(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    run = BudgetedRun(tmp_path, minutes=1.0, steps=10)
    for _ in range(4):
        lr = run.set_learning_rate(opt, 1e-3, warmup_steps=2)
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        run.finish_step(time.time(), 5)
    run.save(model, opt)
    next_lr = run.set_learning_rate(opt, 1e-3, warmup_steps=2)

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    resumed = BudgetedRun(tmp_path, minutes=1.0, steps=10)
    resumed.resume(fresh, fresh_opt)
    assert resumed.step == 4 and resumed.progress == 0.4 and lr > next_lr
    assert resumed.set_learning_rate(fresh_opt, 1e-3, warmup_steps=2) == next_lr
    torch.testing.assert_close(fresh.weight, model.weight, atol=0, rtol=0)
    assert fresh_opt.state_dict()["state"][0]["step"] == 4
