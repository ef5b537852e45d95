"""Script → Plan: blocks, events, exact frame ranges, warnings (fps 16, blocks of 3 latent
frames, VAE temporal factor 4: the first block makes 9 video frames, every later block 12)."""
from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.grammar import Script, Segment, parse
from pipeline.plan import CUT, FLUSH, START, blocks_for_frames, make_plan, video_frames_after
from utils.errors import ConfigError, PromptError

FPS, FPB, TF = 16, 3, 4


def plan_of(prompt: str):
    return make_plan(parse(prompt, 5.0), FPS, FPB, TF)


def summary(plan):
    """(first_block, num_blocks, event, frames) per segment."""
    return [(s.first_block, s.num_blocks, s.event, s.frames) for s in plan.segments]


def test_video_frames_after_blocks():
    assert [video_frames_after(n, 3, 4) for n in range(5)] == [0, 9, 21, 33, 45]
    assert [video_frames_after(n, 1, 4) for n in range(4)] == [0, 1, 5, 9]
    assert [blocks_for_frames(f, 3, 4) for f in (0, 1, 9, 10, 21, 22, 480)] == [0, 1, 1, 2, 2, 3, 41]


def test_single_action_30s():
    plan = plan_of("action_1_prompt[30s]")
    assert (plan.total_frames, plan.total_blocks) == (480, 41)  # 9 + 40·12 = 489 ≥ 480
    assert summary(plan) == [(0, 41, START, (0, 480))]
    assert plan.block_events == (START,) + (None,) * 40
    assert plan.warnings == ()


def test_multi_action_smooth_transitions():
    plan = plan_of("action_1_prompt[5s] | action_2_prompt[10s] | action_3_prompt[15s]")
    assert (plan.total_frames, plan.total_blocks) == (480, 41)
    # cumulative ends 80 and 240 frames → nearest boundaries 81 (7 blocks) and 237 (20 blocks)
    assert summary(plan) == [(0, 7, START, (0, 81)), (7, 13, FLUSH, (81, 237)),
                             (20, 21, FLUSH, (237, 480))]
    assert [i for i, e in enumerate(plan.block_events) if e] == [0, 7, 20]


def test_multi_scene_cuts():
    plan = plan_of("action_1_prompt[10s] | action_2_prompt[10s#] | action_3_prompt[10s#]")
    # cumulative ends 160 and 320 frames → boundaries 165 (14 blocks) and 321 (27 blocks)
    assert summary(plan) == [(0, 14, START, (0, 165)), (14, 13, CUT, (165, 321)),
                             (27, 14, CUT, (321, 480))]
    assert plan.block_events[14] == CUT and plan.block_events[27] == CUT
    assert plan.block_segment[13:15] == (0, 1)


def test_multi_scene_with_subtitles_json():
    plan = plan_of("action_1[10s] | action_2[10s#] | action_3[10s#] ; "
                   "subtitle_1 | subtitle_2 | subtitle_3")
    assert plan.to_json_dict() == {
        "fps": 16, "frames_per_block": 3, "total_blocks": 41, "total_frames": 480,
        "segments": [
            {"text": "action_1", "subtitle": "subtitle_1", "requested_seconds": 10.0,
             "actual_seconds": 165 / 16, "first_block": 0, "num_blocks": 14, "event": "start",
             "frames": [0, 165]},
            {"text": "action_2", "subtitle": "subtitle_2", "requested_seconds": 10.0,
             "actual_seconds": 156 / 16, "first_block": 14, "num_blocks": 13, "event": "cut",
             "frames": [165, 321]},
            {"text": "action_3", "subtitle": "subtitle_3", "requested_seconds": 10.0,
             "actual_seconds": 159 / 16, "first_block": 27, "num_blocks": 14, "event": "cut",
             "frames": [321, 480]},
        ]}
    json.dumps(plan.to_json_dict())  # serialisable as is


def test_barbie_example():
    plan = plan_of("Barbie walks on the beach[5s] | Barbie dances on the beach[5s] | "
                   "Barbie in a pink city at night[5s#] ; walking | dancing | night city")
    assert (plan.total_frames, plan.total_blocks) == (240, 21)
    assert summary(plan) == [(0, 7, START, (0, 81)), (7, 7, FLUSH, (81, 165)),
                             (14, 7, CUT, (165, 240))]
    assert [s.subtitle for s in plan.segments] == ["walking", "dancing", "night city"]
    assert [s.actual_seconds for s in plan.segments] == [81 / 16, 84 / 16, 75 / 16]
    assert plan.warnings == ()
    # subtitle lookup per frame
    assert [plan.segment_of_frame(f) for f in (0, 80, 81, 164, 165, 239)] == [0, 0, 1, 1, 2, 2]
    # the last block is trimmed: 21 blocks make 249 frames, 240 are written
    assert plan.block_frames(20) == (237, 240) and plan.frames_after(21) == 249


def test_durations_that_do_not_divide_into_blocks(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        plan = plan_of("a[1s] | b[1.3s] | c[2.2s]")
    # 4.5 s → 72 frames → 7 blocks (81 frames, 9 trimmed); ends at 16 and 36.8 frames snap to
    # the boundaries 21 (2 blocks) and 33 (3 blocks)
    assert (plan.total_frames, plan.total_blocks) == (72, 7)
    assert summary(plan) == [(0, 2, START, (0, 21)), (2, 1, FLUSH, (21, 33)),
                             (3, 4, FLUSH, (33, 72))]
    # b asked for 1.3 s and got 0.75 s: more than half a block (0.375 s) off → reported
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("segment 2 ('b')")
    assert "segment 2 ('b')" in caplog.text


def test_totals_round_seconds_times_fps():
    plan = plan_of("a[1.03s] | b[0.7s]")  # 1.73 s · 16 = 27.68 → 28 frames
    assert plan.total_frames == 28 and plan.total_blocks == 3
    assert plan.segments[-1].frames[1] == 28


def test_segment_shorter_than_a_block_still_gets_one():
    plan = plan_of("a[0.1s] | b[10s]")
    assert summary(plan)[0] == (0, 1, START, (0, 9))
    assert plan.total_frames == 162  # round(10.1 · 16): the total is kept
    assert plan.warnings and plan.warnings[0].startswith("segment 1")


def test_more_segments_than_blocks_grow_the_video():
    """0.2 s would fit one block; two segments need two, and every frame they make is kept."""
    plan = plan_of("a[0.1s] | b[0.1s]")
    assert (plan.total_blocks, plan.total_frames) == (2, 21)
    assert summary(plan) == [(0, 1, START, (0, 9)), (1, 1, FLUSH, (9, 21))]
    assert len(plan.warnings) == 3 and "the video is 21 frames (1.3125 s), not the requested 3" in plan.warnings[0]


def test_a_video_longer_than_requested_is_reported_even_when_no_segment_moved_far():
    """Four half-second segments: each is off by at most a quarter second (within half a block),
    but the video is 45 frames, not the 32 requested; that is reported."""
    plan = plan_of("a[0.5s] | b[0.5s] | c[0.5s] | d[0.5s]")
    assert (plan.total_blocks, plan.total_frames) == (4, 45)
    assert len(plan.warnings) == 1 and "45 frames (2.8125 s), not the requested 32 (2 s)" in plan.warnings[0]
    assert not plan_of("a[1s] | b[1s]").warnings  # a video of the requested length says nothing


def test_tiny_single_segment_has_at_least_one_frame():
    plan = plan_of("a[0.01s]")
    assert (plan.total_blocks, plan.total_frames) == (1, 1)


def test_per_block_columns_behave_like_tuples():
    plan = plan_of("a[1s] | b[1s#]")
    assert len(plan.block_events) == plan.total_blocks == 3
    assert tuple(plan.block_events) == (START, None, CUT) == plan.block_events
    assert list(plan.block_segment) == [0, 0, 1] and plan.block_segment[-1] == 1
    with pytest.raises(IndexError):
        plan.block_events[3]
    # a very long video keeps a small plan
    long = plan_of("a[86400s] | b[86400s#]")  # two days
    assert long.total_blocks == 230401 and long.block_events[115200] == CUT
    assert len(plan_of("a[1000000000s]").block_segment) == 1333333334


def test_total_too_long_to_plan_is_a_prompt_error():
    with pytest.raises(PromptError, match="too long"):
        plan_of("a[1" + "0" * 308 + "s]")


def test_bad_geometry_is_a_config_error():
    script = parse("a[1s]", 5.0)
    for fps, fpb in ((0, 3), (16, 0), (float("nan"), 3), (16, 2.5)):
        with pytest.raises(ConfigError):
            make_plan(script, fps, fpb, TF)


durations = st.floats(min_value=0.01, max_value=120, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(durations, st.booleans()), min_size=1, max_size=8),
       st.sampled_from([(16, 3, 4), (24, 3, 4), (16, 1, 4), (15.5, 2, 4), (8, 4, 2)]))
def test_plan_is_contiguous_and_covers_every_frame(items, geometry):
    fps, fpb, tf = geometry
    script = Script(tuple(Segment(f"s{k}", sec, k > 0 and cut)
                          for k, (sec, cut) in enumerate(items)))
    plan = make_plan(script, fps, fpb, tf)
    segs = plan.segments
    # blocks: at least one each, contiguous, all of them, no more than needed
    assert all(s.num_blocks >= 1 for s in segs)
    assert segs[0].first_block == 0
    assert all(a.first_block + a.num_blocks == b.first_block for a, b in zip(segs, segs[1:]))
    assert segs[-1].first_block + segs[-1].num_blocks == plan.total_blocks
    assert video_frames_after(plan.total_blocks, fpb, tf) >= plan.total_frames
    # frames: contiguous, non-empty, cover [0, total_frames)
    assert segs[0].frames[0] == 0 and segs[-1].frames[1] == plan.total_frames
    assert all(a.frames[1] == b.frames[0] for a, b in zip(segs, segs[1:]))
    assert all(s.frames[0] < s.frames[1] for s in segs)
    # total: round(seconds · fps), unless more segments than covering blocks forced more
    wanted = max(1, round(sum(sec for sec, _ in items) * fps))
    if plan.total_blocks == blocks_for_frames(wanted, fpb, tf):
        assert plan.total_frames == wanted
    else:
        assert plan.total_blocks == len(segs)
        assert plan.total_frames == video_frames_after(len(segs), fpb, tf)
    # events
    expected = [START] + [CUT if s.cut else FLUSH for s in script.segments[1:]]
    assert [s.event for s in segs] == expected
    events = list(plan.block_events)
    assert [i for i, e in enumerate(events) if e] == [s.first_block for s in segs]
    assert [events[s.first_block] for s in segs] == expected
    assert [plan.block_segment[s.first_block] for s in segs] == list(range(len(segs)))
    # each segment but the last ends at the feasible boundary nearest its cumulative end
    cumulative = 0.0
    for k, planned in enumerate(segs[:-1]):
        cumulative += script.segments[k].seconds
        end = planned.first_block + planned.num_blocks
        lo, hi = planned.first_block + 1, plan.total_blocks - (len(segs) - 1 - k)
        distance = lambda b: abs(video_frames_after(b, fpb, tf) - cumulative * fps)  # noqa: E731
        assert all(distance(end) <= distance(b) for b in (end - 1, end + 1) if lo <= b <= hi)
    # a segment more than half a block off its request is reported, and only such a segment
    half_block = tf * fpb / fps / 2
    for k, (s, planned) in enumerate(zip(script.segments, segs)):
        off = abs(planned.actual_seconds - s.seconds) > half_block + 1e-9
        assert off == any(w.startswith(f"segment {k + 1} ") for w in plan.warnings)
