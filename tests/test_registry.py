"""Walk the whole model registry through the engine's path: forward, backward, prune, export, reload."""

from __future__ import annotations

import pytest
import torch

from app_common.spec import JobSpec
from app_engine.export import export_artifacts, load_model
from app_engine.models import create_model, list_models, prunable_parameters
from app_engine.pruning import Masks, prune


@pytest.mark.parametrize("arch", list_models())
def test_model_goes_through_the_whole_engine_path(tmp_path, arch):
    torch.manual_seed(0)
    shape = (3, 64, 64) if arch.endswith("_imagenet") else (3, 8, 8)  # the ImageNet stem needs >= 64 px
    info = {"architecture": arch, "input_shape": list(shape), "num_classes": 5, "mean": [0.5] * 3,
            "std": [0.25] * 3, "classes": [str(i) for i in range(5)]}
    model = create_model(arch, input_shape=shape, num_classes=5, mean=info["mean"], std=info["std"])
    x = torch.randint(0, 256, (4, *shape), dtype=torch.uint8)
    y = torch.randint(0, 5, (4,))

    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    params = prunable_parameters(model)
    assert all(p.grad is not None for p in params.values())

    masks = prune(model, params, Masks.ones(params), pruner="snip", keep=0.366, scope="global",
                  batches=[(x, y)], seed=0)
    assert masks.density() == pytest.approx(0.366, abs=len(params) / masks.total())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert zeros >= masks.total() - masks.nonzero()

    spec = JobSpec.from_dict({"architecture": arch, "dataset": {"name": "synthetic"}})
    model.eval()
    with torch.no_grad():
        expected = model(x)
    files = export_artifacts(model, masks.state_dict(), tmp_path, spec=spec, model_info=info,
                             metrics={"megabatches": []}, formats=["safetensors", "sparse"])
    assert files["model.sparse.safetensors"]["bytes"] < files["model.safetensors"]["bytes"]
    reloaded = load_model(tmp_path, source="sparse")
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
