"""uids: 128 bits from the URL alone, parsed into keys that sort and search like the hex strings."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

from lmeye.uid import UID_BYTES, UID_KEY, UID_LEN, key_order, key_to_uid, uid_for, uid_keys


def test_uids_are_128_bit_stable_and_from_the_url_alone():
    url = "https://example.com/a.jpg"
    uid = uid_for(url)
    assert len(uid) == 32 and UID_LEN == 32 and UID_BYTES == 16
    assert uid == hashlib.blake2b(url.encode(), digest_size=16).hexdigest()  # the documented recipe
    assert uid_for(f"  {url}\n") == uid and uid_for(url + "?x") != uid


def test_collisions_are_negligible_at_ten_billion_rows():
    n, bits = 1e10, 8 * UID_BYTES
    p_any_collision = -math.expm1(-n * (n - 1) / 2 ** (bits + 1))  # birthday bound
    assert p_any_collision < 1e-6


def test_parsing_is_vectorised_and_strict():
    good = "0123456789abcdef" + "fedcba9876543210"
    keys, valid = uid_keys([good, good.upper(), "xyz", None, good[:-1] + "g", good[:16]])
    assert keys.dtype == UID_KEY
    assert valid.tolist() == [True, True, False, False, False, False]
    assert int(keys[0]["hi"]) == 0x0123456789ABCDEF and int(keys[0]["lo"]) == 0xFEDCBA9876543210
    assert keys[1] == keys[0] and keys[2] == np.zeros(1, UID_KEY)[0]
    assert key_to_uid(keys[0]["hi"], keys[0]["lo"]) == good
    sliced = pa.array(["0" * 30 + "aa", "0" * 30 + "bb", "0" * 30 + "cc"])[1:]  # Arrow offset honoured
    assert uid_keys(sliced)[0]["lo"].tolist() == [0xBB, 0xCC]
    chunked = pa.chunked_array([pa.array([good], pa.large_string()), pa.array([uid_for("x")], pa.large_string())])
    assert uid_keys(chunked)[1].all()


def _shared_top_half(n: int, rng) -> list[str]:
    """uids that pairwise share their top 64 bits (the rare case searching by hi alone gets wrong)."""
    tops = [f"{int(x):016x}" for x in rng.integers(0, 2**63, n // 3, dtype=np.uint64)]
    return [t + f"{int(x):016x}" for t in tops for x in rng.integers(0, 2**63, 3, dtype=np.uint64)]


def test_order_matches_the_hex_strings_even_when_top_halves_tie():
    rng = np.random.default_rng(0)
    uids = [uid_for(f"u{i}") for i in range(500)] + _shared_top_half(60, rng)
    rng.shuffle(uids)
    keys, _ = uid_keys(uids)
    order = key_order(keys)
    assert [uids[i] for i in order] == sorted(uids)


def test_keys_work_with_numpy_set_operations():
    """What the download stage's dedupe relies on: unique (first index), isin, union1d."""
    uids = [uid_for("a"), uid_for("b"), uid_for("a"), uid_for("c")]
    keys, _ = uid_keys(uids)
    _, first = np.unique(keys, return_index=True)
    assert sorted(first.tolist()) == [0, 1, 3]
    seen = np.union1d(np.zeros(0, UID_KEY), keys[[1]])
    assert np.isin(keys, seen).tolist() == [False, True, False, False]
