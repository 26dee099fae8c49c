"""A served PyTorch model on a GPU answers from CUDA graphs, one per power-of-two batch size:
the same probabilities as its eager forward, whatever the batch size."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_graphed_forward_matches_the_eager_forward_at_every_batch_size():
    from bakeoff.engines.torch.trial import GraphedForward

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))
    model = model.to(dev).eval().to(memory_format=torch.channels_last)

    def forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(x)

    graphed = GraphedForward(forward, dev)
    with torch.no_grad():
        for n in (1, 3, 8, 32, 3, 17):  # sizes revisit a bucket whose padding holds older images
            x = torch.randn(n, 3, 24, 24, device=dev).contiguous(memory_format=torch.channels_last)
            got, want = graphed(x).float(), forward(x).float()
            assert got.shape == (n, 5)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert sorted(k[0] for k in graphed.graphs) == [1, 4, 8, 32] and not graphed.errors
