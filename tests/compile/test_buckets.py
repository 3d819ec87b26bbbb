import pytest

from kiln.compile.buckets import BucketPlan, make_buckets, pick


def test_ramp_then_steps_and_max_always_present():
    assert make_buckets(1, 32, 64) == (1, 2, 4, 8, 16, 32, 64)
    assert make_buckets(16, 128, 600) == (16, 32, 64, 128, 256, 384, 512, 600)
    assert make_buckets(4, 32, 128) == (4, 8, 16, 32, 64, 96, 128)
    assert make_buckets(5, 5, 5) == (5,)


def test_bad_range_is_rejected():
    with pytest.raises(ValueError, match="min <= max"):
        make_buckets(8, 4, 4)


def test_pick_smallest_holding_bucket():
    b = make_buckets(1, 32, 64)
    assert [pick(b, n) for n in (1, 3, 5, 32, 33, 64)] == [1, 4, 8, 32, 64, 64]
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        pick(b, 65)


def test_required_buckets_hold_every_admissible_prefill():
    plan = BucketPlan(prompt_bs=make_buckets(1, 4, 8), prompt_seq=make_buckets(16, 64, 256),
                      decode_bs=make_buckets(1, 4, 8), decode_blocks=make_buckets(2, 8, 16), max_prompt_tokens=512)
    prefill, decode = plan.required_buckets()
    assert decode == [(8, 16)]
    for b, s in plan.prefill_buckets():
        assert b * s <= 512
        assert any(rb >= b and rs >= s for rb, rs in prefill), (b, s)
    assert plan.max_prefill_seq(3) == 128          # 3 rows pad to 4; 4 x 128 <= 512 < 4 x 192
