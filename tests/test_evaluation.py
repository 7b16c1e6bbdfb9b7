import torch

from ldm_app.evaluation import frechet_distance, psnr, r_precision


def test_psnr_of_known_error():
    a = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(a, a + 0.1), torch.full((2,), 20.0), atol=1e-4)


def test_frechet_distance_is_zero_for_same_set_and_matches_closed_form_for_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g)
    assert abs(frechet_distance(x, x)) < 1e-6
    # same covariance, mean shifted by 2 in one dimension → distance 4
    assert abs(frechet_distance(x, x + torch.tensor([2.0, 0, 0])) - 4.0) < 1e-6
    # isotropic scale 1 vs 2 (×3 dims): tr(1 + 4 − 2·2) · 3 = 3
    y = torch.randn(200_000, 3, generator=g)
    assert abs(frechet_distance(y, 2 * torch.randn(200_000, 3, generator=g)) - 3.0) < 0.05


def test_r_precision_counts_top_choices():
    text = torch.eye(4)
    images = torch.eye(4)
    images[3] = text[0]  # image 3 looks like caption 0
    distractors = torch.tensor([[1, 2], [0, 2], [0, 1], [0, 1]])
    assert r_precision(images, text, torch.arange(4), distractors) == 0.75
