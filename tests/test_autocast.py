"""Both backends under CPU bfloat16 autocast, the stand-in here for fp16 autocast on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from backend_oracle import randomize_weights
from spark_sparse import build_spark
from spark_sparse.masking import draw_mask


@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny"])
def test_bfloat16_step_matches_masked(model, photos_96):
    """Under CPU bfloat16 autocast the spconv backend is as accurate as the masked one.

    bfloat16 keeps 8 bits of precision, and the batch norms of these small inputs
    normalise over a few rows, so the masked backend's own bfloat16 gradient
    points only about 0.9 (cosine) along its float32 one. The check is therefore
    that spconv's bfloat16 loss matches to 2 % and that its gradient is no further
    from the float32 gradient than the masked backend's is.
    """
    torch.manual_seed(0)
    masked = build_spark(model, 96, backend="masked", decoder_width=64)
    sparse = build_spark(model, 96, backend="spconv", decoder_width=64)
    randomize_weights(masked, seed=1)
    sparse.load_state_dict(masked.state_dict(), strict=True)
    active = draw_mask(3, (3, 3), 0.6, generator=torch.Generator().manual_seed(11))

    def step(spark, autocast: bool):
        spark.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = spark(photos_96[:3], active)
        loss.backward()
        # ConvNeXt's head norm is kept for the export but takes no part in pre-training.
        grads = {name: p.grad for name, p in spark.named_parameters() if not name.startswith("encoder.head.")}
        for name, grad in grads.items():
            assert grad is not None, name
            assert grad.dtype == torch.float32, name
            assert torch.isfinite(grad).all(), name
        return loss.detach(), torch.cat([grads[name].flatten() for name in sorted(grads)])

    loss_fp32, grad_fp32 = step(masked, autocast=False)
    loss_masked, grad_masked = step(masked, autocast=True)
    loss_sparse, grad_sparse = step(sparse, autocast=True)

    torch.testing.assert_close(loss_sparse, loss_masked, rtol=2e-2, atol=0.0)
    torch.testing.assert_close(loss_sparse, loss_fp32, rtol=2e-2, atol=0.0)
    masked_cosine = F.cosine_similarity(grad_masked, grad_fp32, dim=0).item()
    sparse_cosine = F.cosine_similarity(grad_sparse, grad_fp32, dim=0).item()
    assert sparse_cosine > masked_cosine - 0.05, f"cosine to float32: spconv {sparse_cosine:.3f}, masked {masked_cosine:.3f}"
