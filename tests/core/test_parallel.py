"""The rule behind ``train.parallelism=auto``: a full replica's memory against a worker's."""

from __future__ import annotations

from sftray.core.parallel import REPLICA_SHARE, choose_parallelism, replica_bytes

GIB = 1024**3


def test_a_replica_counts_weights_and_the_gradients_and_adamw_state_of_trainable_parameters():
    assert replica_bytes(params=1000, trainable=1000) == 1000 * (4 + 4 + 8)
    assert replica_bytes(params=1000, trainable=0) == 1000 * 4


def test_a_replica_that_fits_with_room_to_spare_trains_with_ddp():
    one_billion = replica_bytes(params=10**9, trainable=10**9)  # 16 GB
    assert choose_parallelism(replica=one_billion, worker_memory=80 * GIB) == "ddp"


def test_a_replica_that_does_not_fit_or_leaves_no_room_trains_with_fsdp():
    one_billion = replica_bytes(params=10**9, trainable=10**9)
    assert choose_parallelism(replica=one_billion, worker_memory=8 * GIB) == "fsdp"  # does not fit
    assert choose_parallelism(replica=one_billion, worker_memory=int(one_billion / REPLICA_SHARE) - 1) == "fsdp"


def test_lora_keeps_the_optimizer_state_small_enough_for_ddp_where_full_fine_tuning_needs_fsdp():
    params, adapters = 10**9, 10**7  # an adapter share of ~1%
    worker = 12 * GIB
    assert choose_parallelism(replica=replica_bytes(params=params, trainable=params), worker_memory=worker) == "fsdp"
    assert choose_parallelism(replica=replica_bytes(params=params, trainable=adapters), worker_memory=worker) == "ddp"
