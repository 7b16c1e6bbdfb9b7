"""The objective's maths, checked against closed forms with a UNet stub whose prediction is chosen by hand."""

from types import SimpleNamespace

import pytest
import torch

from ldm_app.batches import Batch
from ldm_app.config import ObjectiveConfig
from ldm_app.objective import DenoisingLoss, diffusion_loss, noise_scheduler, sampling_scheduler


class FixedPrediction(torch.nn.Module):
    """A UNet stand-in: returns `prediction` (zeros if None) and records the text states it was given."""

    def __init__(self, prediction: torch.Tensor | None = None):
        super().__init__()
        self.prediction, self.contexts = prediction, []

    def forward(self, x, t, encoder_hidden_states):
        self.contexts.append(encoder_hidden_states)
        return SimpleNamespace(sample=torch.zeros_like(x) if self.prediction is None else self.prediction)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_the_three_views_weight_one_x0_error_as_the_closed_forms_say(gamma):
    # The same x̂0 expressed as ε̂, x̂0 and v̂: ε-MSE = SNR·x0-MSE and v-MSE = (SNR+1)·x0-MSE, and min-SNR-γ
    # weighting turns all three into min(SNR, γ)·x0-MSE
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    x0_hat = x0 + 0.1 * torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 100, 400, 800, 999])
    losses = {}
    for kind in ("epsilon", "sample", "v_prediction"):
        scheduler = noise_scheduler(ObjectiveConfig(prediction_type=kind, snr_gamma=gamma))
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
        prediction = {"epsilon": eps_hat, "sample": x0_hat, "v_prediction": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}
        losses[kind] = diffusion_loss(FixedPrediction(prediction[kind]), scheduler, x0, torch.zeros(6, 3, 8), noise, t,
                                      gamma).item()
    snr = (a / (1 - a)).flatten()
    x0_mse = (x0_hat - x0).square().mean(dim=(1, 2, 3))
    if gamma is None:
        assert losses["sample"] == pytest.approx(x0_mse.mean().item(), rel=1e-4)
        assert losses["epsilon"] == pytest.approx((snr * x0_mse).mean().item(), rel=1e-3)
        assert losses["v_prediction"] == pytest.approx(((snr + 1) * x0_mse).mean().item(), rel=1e-3)
    else:
        expected = (snr.clamp(max=gamma) * x0_mse).mean().item()
        for kind in losses:
            assert losses[kind] == pytest.approx(expected, rel=1e-3), kind


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_caption_dropout_swaps_the_text_states_for_the_empty_prompts(dropout):
    b = 16
    batch = Batch(torch.zeros(b, 4, 8, 8), torch.ones(b, 4, 8, 8), torch.zeros(b, 5, dtype=torch.long),
                  torch.ones(b, 5, 3))
    empty, unet = torch.full((1, 5, 3), -1.0), FixedPrediction()
    loss = DenoisingLoss(noise_scheduler(ObjectiveConfig()), ObjectiveConfig(caption_dropout=dropout), empty, 1.0)
    loss(unet, batch, torch.Generator().manual_seed(0))
    assert torch.equal(unet.contexts[0], (empty if dropout == 1.0 else batch.context).expand(b, 5, 3))


def test_exported_sampler_uses_the_training_schedule_and_zero_snr_starts_at_the_last_step():
    objective = ObjectiveConfig(prediction_type="v_prediction", zero_terminal_snr=True)
    training, sampling = noise_scheduler(objective), sampling_scheduler(objective)
    torch.testing.assert_close(sampling.alphas_cumprod, training.alphas_cumprod, rtol=0, atol=0)
    assert sampling.alphas_cumprod[-1] == 0  # x_T is pure noise
    sampling.set_timesteps(10)
    assert int(sampling.timesteps[0]) == objective.num_train_timesteps - 1
