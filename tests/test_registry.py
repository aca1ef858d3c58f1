"""One declaration per distance (pipeline/distances.py): the config's values, the kernels,
the torch rows, the fused head, the `loss=` options and the README's table all follow it."""

import re
from pathlib import Path

import pytest

from pipeline import kernels, losses
from pipeline.cache.format import REPRESENTATIONS
from pipeline.config import Distance
from pipeline.distances import DISTANCES
from pipeline.fused_head import FUSED_DISTANCES
from tests.support import compose_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_declaration_names_a_kernel_and_torch_rows_that_exist():
    assert [d.value for d in Distance] == list(DISTANCES)
    for spec in DISTANCES.values():
        assert spec.reads in REPRESENTATIONS
        assert callable(getattr(losses, spec.reference)), spec.name
        if spec.kernel:
            assert callable(getattr(kernels, spec.kernel)), spec.name
    assert FUSED_DISTANCES == tuple(n for n, d in DISTANCES.items() if d.kernel)
    assert set(kernels.DENSE) == {n for n, d in DISTANCES.items() if d.kernel and d.reads == "full"}


@pytest.mark.parametrize("name", list(DISTANCES))
def test_loss_option_of_each_distance_is_its_name(name):
    cfg = compose_config(f"loss={name}", "loss.lam=0.5")
    assert cfg.loss.distance == name and cfg.loss.lam == 0.5 and cfg.loss.alpha == 1.0


def test_the_readme_table_lists_every_declared_distance_and_no_other():
    section = README.read_text().split("## Distances and kernels", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    listed = [n for ln in rows for n in re.findall(r"`(\w+)`", ln.split("|")[1])]
    assert sorted(listed) == sorted(DISTANCES)


def test_a_distance_reading_what_the_cache_lacks_says_what_to_capture():
    from pipeline.cache.format import Manifest

    m = Manifest(backend="zarr", modes=["full"], dtype="float16", num_classes=5, rows=4, chunk_rows=4,
                 shard_rows=4, splits={"train": [0, 4]}, fingerprint={}, shards=[], k=0, samples=0,
                 temperatures=[1.0], sample_temperature=1.0)
    for name, spec in DISTANCES.items():
        loss = compose_config(f"loss={name}", "loss.temperature=1").loss
        if spec.reads == "full":
            assert losses.teacher_arrays(m, loss) == (REPRESENTATIONS["full"].arrays, 0)
        else:
            with pytest.raises(ValueError, match=rf"trains from the '{spec.reads}' representation.*"
                                                 rf"cache.modes=\[{spec.reads}\]"):
                losses.teacher_arrays(m, loss)
