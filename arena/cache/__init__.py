"""The HDF5 feature cache: per-video backbone features for every TTA variant, with the provenance that made them.

Modules, in the order a cache lives:

* `provenance` -- what determines the features (the cache's identity), compared on every open;
* `layout` -- the file on disk: compacted HDF5 + staged parts, read and written deterministically;
* `writer` -- `CacheWriter` (crash-safe staging, lock, compaction), `merge_shards` and `absorb_shards`;
* `reader` -- `FeatureCache` over one file or a shard set;
* `shards` -- shard names, ``--shard i/n`` and which paths make one cache.
"""

from arena.cache.layout import FORMAT, FORMAT_VERSION, STATUSES
from arena.cache.provenance import FEATURE_FORMAT, Provenance
from arena.cache.reader import FeatureCache
from arena.cache.shards import parse_shard, shard_files, shard_items, shard_path
from arena.cache.writer import CacheWriter, absorb_shards, cached_statuses, merge_shards
from arena.errors import CacheError
from arena.sampling import union_indices  # the frames a cache row set holds; re-exported for the cache's users

__all__ = [
    "FEATURE_FORMAT",
    "FORMAT",
    "FORMAT_VERSION",
    "STATUSES",
    "CacheError",
    "CacheWriter",
    "FeatureCache",
    "Provenance",
    "absorb_shards",
    "cached_statuses",
    "merge_shards",
    "parse_shard",
    "shard_files",
    "shard_items",
    "shard_path",
    "union_indices",
]
