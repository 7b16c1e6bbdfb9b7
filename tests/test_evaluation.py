import torch

from ldm_app.evaluation import frechet_distance, psnr, r_precision


def test_psnr_is_per_image():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1
    b[1] += 0.01
    values = psnr(a, b)
    assert values.shape == (2,)
    torch.testing.assert_close(values, torch.tensor([20.0, 40.0]), atol=1e-4, rtol=0)


def test_frechet_distance_is_zero_for_same_set_and_matches_closed_form_for_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g)
    assert abs(frechet_distance(x, x)) < 1e-6
    # same covariance, mean shifted by 2 in one dimension → distance 4
    assert abs(frechet_distance(x, x + torch.tensor([2.0, 0, 0])) - 4.0) < 1e-6
    # isotropic scale 1 vs 2 (×3 dims): tr(1 + 4 − 2·2) · 3 = 3
    y = torch.randn(200_000, 3, generator=g)
    assert abs(frechet_distance(y, 2 * torch.randn(200_000, 3, generator=g)) - 3.0) < 0.05


def test_frechet_distance_with_covariances_that_do_not_commute():
    # samples whitened exactly, then given covariances A = diag(9, 1) and B = [[5, 4], [4, 5]]:
    # tr(A + B − 2 (A^½ B A^½)^½) = 20 − 2·√68
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 2, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    a = z @ torch.linalg.cholesky(torch.tensor([[9.0, 0], [0, 1]], dtype=torch.float64)).T
    b = z @ torch.linalg.cholesky(torch.tensor([[5.0, 4], [4, 5]], dtype=torch.float64)).T
    assert abs(frechet_distance(a, b) - (20 - 2 * 68 ** 0.5)) < 1e-6


def test_r_precision_counts_top_choices():
    text = torch.eye(4)
    images = torch.eye(4)
    images[3] = text[0]  # image 3 looks like caption 0
    distractors = torch.tensor([[1, 2], [0, 2], [0, 1], [0, 1]])
    assert r_precision(images, text, torch.arange(4), distractors) == 0.75
