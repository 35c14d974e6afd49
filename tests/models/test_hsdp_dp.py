"""HSDP with data parallelism: each replica sharded over its own ranks, never across.

One 4-rank gloo run (2 data-parallel replicas x Ulysses 2, ``use_hsdp``) of tiny FLUX.1
against the unsharded 1-rank run: the returning rank of EACH replica (ranks 0 and 2)
has final latents within :data:`LAYOUT_LATENT_TOL` and images within 1/255; every rank
holds half of the transformer (its shard group is its replica's two ranks), and the
two ranks of one replica together hold it exactly once.
"""

from ithaca.config import ParallelConfig
from ithaca.models.flux.pipeline import FluxPipeline
from tests.models.harness import CFG_REQUEST, LAYOUT_LATENT_TOL, max_image_diff
from tests.models.test_hsdp import measured


def test_each_data_parallel_replica_is_sharded_over_its_own_ranks(worker_pool, tiny_family):
    path = tiny_family(FluxPipeline)
    batch = [CFG_REQUEST]
    (ref_images, ref_latents, _), [(full, _, _)] = measured("generate", {}, path, batch)
    layout = dict(data_parallel_size=2, ulysses_degree=2, use_hsdp=True)
    assert ParallelConfig(**layout).hsdp_sizes() == (1, 2)
    results = worker_pool(4).run(measured, "generate", layout, path, batch)
    for root in (0, 2):  # each replica's returning rank ran the whole request
        (images, latents, _), _ = results[root]
        err = (latents[0] - ref_latents[0]).abs().max().item()
        assert err <= LAYOUT_LATENT_TOL, (root, err)
        assert max_image_diff(images[0], ref_images[0]) <= 1, root
    shards = [r[1][0] for r in results]  # (bytes, shard world size, shard rank) per rank
    assert [(size, rank) for _, size, rank in shards] == [(2, 0), (2, 1), (2, 0), (2, 1)]
    for first in (0, 2):  # one replica's two ranks: the transformer once, half each
        held = [shards[first][0], shards[first + 1][0]]
        assert sum(held) == full and max(held) <= full / 2 * 1.02, (held, full)
