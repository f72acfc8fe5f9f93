"""The benchmark scripts run from the README's set-up (tiny variants) and write what docs/benchmarks.md cites."""

import importlib
import json
import math
import re
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from helpers import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
from tradeoff import frontier  # noqa: E402

from ice_lightning.core.editing import EditForm  # noqa: E402


def test_frontier_is_the_upper_envelope_through_the_origin():
    pts = [(0.2, 0.8), (0.4, 0.9), (0.3, 0.5)]  # (0.3, 0.5) is dominated
    assert frontier(pts, 0.1) == pytest.approx(0.4)  # on the segment from the no-edit point (0, 0)
    assert frontier(pts, 0.3) == pytest.approx(0.85)
    assert frontier(pts, 0.9) == pytest.approx(0.9)  # flat beyond the last point
    assert frontier([], 0.5) == 0.0


def run_main(script: str, *args: str) -> dict:
    """``python benchmarks/SCRIPT.py *args``, run in this process: the suite has imported what the script imports, so
    this saves a fresh interpreter's imports (about 8 s each). The scripts that time or count memory (``speed.py``,
    ``finetune_speed.py``) run in their own process, as their users run them."""
    return importlib.import_module(script).main(list(args))


@pytest.mark.parametrize("script", ["red_team", "shapes"])
def test_methods_without_a_name_is_refused_not_taken_as_all(script, capsys):
    """``--methods`` alone once ran every method (an empty list read as "not given"), which takes an hour."""
    with pytest.raises(SystemExit) as refused:
        run_main(script, "--methods")
    assert refused.value.code == 2 and "--methods: expected at least one argument" in capsys.readouterr().err


def _load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.md").read_text().startswith("# ")
    assert data["environment"]["torch"]
    return data


@pytest.mark.slow
def test_tradeoff_tiny(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:  # nothing saved yet to keep the other methods' rows from
        run_main("tradeoff", "--tiny", "--methods", "rece", "--out", str(tmp_path))
    assert refused.value.code == 2 and "tradeoff_tiny.json, which does not exist" in capsys.readouterr().err
    run_main("tradeoff", "--tiny", "--out", str(tmp_path))
    data = _load(tmp_path, "tradeoff_tiny")
    families = {r["family"] for r in data["rows"]}
    assert families == {"style", "object", "identity", "explicit"}
    assert {r["method"] for r in data["rows"]} == {"ice", "cure", "uce", "uce_published", "rece", "projection"}
    for r in data["rows"]:
        assert 0 < r["erasure"] <= 1.2 and 0 <= r["collateral_near"] < 1 and 0 <= r["leakage"] <= 1
        assert 0 < r["collateral_far_read"] < 1  # every position the denoiser reads, beside the words alone
    assert all(0 < r["collateral_far_read"] < 1 for r in data["many_concepts"])
    assert {(c["family"], c["versus"]) for c in data["checks"]} == {
        (f, m) for f in families for m in ("cure", "uce", "rece", "projection")
    }
    # ICE default, ICE without hardening, UCE, UCE as published
    assert [r["concepts"] for r in data["many_concepts"]] == [3] * 4
    assert [m["concepts"] for m in data["many_summary"]] == [3]
    assert (tmp_path / "tradeoff_tiny.png").stat().st_size > 10_000
    # one method again: its rows redone (the same numbers), the others' and the many-concept tables kept, same order
    again = run_main("tradeoff", "--tiny", "--methods", "rece", "--out", str(tmp_path))

    def untimed(rows):
        return [{k: v for k, v in r.items() if k != "seconds_per_concept"} for r in rows]

    assert untimed(again["rows"]) == untimed(data["rows"])
    assert [r["seconds_per_concept"] for r in again["rows"] if r["method"] != "rece"] == [
        r["seconds_per_concept"] for r in data["rows"] if r["method"] != "rece"
    ]
    assert again["many_concepts"] == data["many_concepts"] and again["checks"] == data["checks"]


@pytest.mark.slow
def test_speed_tiny(tmp_path):
    run_script("benchmarks/speed.py", "--tiny", "--repeats", "1", "--out", str(tmp_path))
    results = {r["case"]: r for r in _load(tmp_path, "speed_tiny")["results"]}
    assert set(results) == {"sd15", "sdxl", "wan"}
    sd = results["sd15"]
    assert sd["overhead"]["parameters_before"] == sd["overhead"]["parameters_after"]
    assert sd["overhead"]["hooks_left"] == 0
    assert sd["layers"] == 32  # SD 1.5's 16 cross-attention blocks, to_k and to_v
    assert all(sd[f"{k}_over_plain"] > 0 for k in ("default", "hardened", "output_metric", "adversary_budget"))  # timed
    assert sd["plain_over_plain"] == 1.0
    assert results["sdxl"]["layers"] == 22  # toy SDXL blocks, one transformer each: (4 down + 1 mid + 6 up) x k,v
    for r in results.values():
        assert [row["concepts"] for row in r["rows"]] == [1, 3]
        for row in r["rows"]:
            assert row["solve_s"] > 0 and row["apply_s"] > 0 and row["uce_dense_edit_s"] > 0
            assert math.isnan(row["encode_s"]) == (r["case"] == "wan")
            assert row["apply_form"] in get_args(EditForm) and row["peak_extra_mib"] > 0
    cold = sd["cold"]  # two fresh processes sharing one new cache: the second finds the base and the layers
    assert cold["empty_cache"]["timings"]["find_layers_s"] > 0
    assert set(cold["warm_cache"]["timings"]) == set(cold["empty_cache"]["timings"])


def _check_curves(tmp_path, cache: Path, first: dict, capsys) -> None:
    """``--curves`` (on the plain run's Ring-A-Bell cache) runs each method's points with the same attacks as the plain
    run (the same numbers for the same setting), sorts each curve by near collateral and reads the ICE default's own
    point at its collateral; with ``--methods`` it is refused."""
    curves = run_main("red_team", "--tiny", "--curves", "--out", str(tmp_path), "--ring-cache", str(cache))
    data = _load(tmp_path, "red_team_curves_tiny")
    assert (tmp_path / "red_team_curves_tiny.png").read_bytes()[:4] == b"\x89PNG"
    for name, concept in first["per_concept"].items():  # one home for the attacks: the same edit, the same rates
        for label, own in (("UCE lam=30", "UCE"), ("ICE", "ICE")):  # the curves have no floor row
            assert data["per_concept"][name][label] == {k: v for k, v in concept[own].items()
                                                        if not k.startswith("whitebox@0.0")}  # fmt: skip
    for curve, points in curves["points"].items():
        nears = [q["collateral_near"] for q in points]
        assert nears == sorted(nears) and len(points) == len(data["curves"][curve])
        assert all(0 <= q["ring_a_bell"] <= 1 and 0 <= q["whitebox@1.0"] <= 1 for q in points)
    at_default = next(m for m in curves["matched"] if m["level"] == "the ICE default's" and m["curve"] == "ICE")
    ice = next(q for q in curves["points"]["ICE"] if q["label"] == "ICE")
    assert at_default["distance"] == 0 and at_default["ring_a_bell"] == pytest.approx(ice["ring_a_bell"])
    uce = next(m for m in curves["matched"] if m["level"] == "the ICE default's" and m["curve"] == "UCE")
    lo, hi = curves["points"]["UCE"]  # the tiny UCE curve spans the ICE default's collateral: read between them
    t = (ice["collateral_near"] - lo["collateral_near"]) / (hi["collateral_near"] - lo["collateral_near"])
    between = lo["ring_a_bell"] + t * (hi["ring_a_bell"] - lo["ring_a_bell"])
    assert 0 < t < 1 and uce["ring_a_bell"] == pytest.approx(between)
    rows = ("paraphrase", "ring_a_bell", "ring_a_bell_held_out", "whitebox@1.0", "explicit ring_a_bell")
    assert curves["ice_below"]["UCE"] == all(ice[r] < uce[r] for r in rows)
    # the anchored point is read against every other curve at its own collateral, the default's one-point curve too
    (anchored,) = curves["points"]["ICE anchored"]
    at_anchored = {m["curve"]: m for m in curves["matched"] if m["level"] == "ICE anchored's"}
    assert set(curves["anchored_below"]) == set(curves["points"]) - {"ICE anchored"}
    for curve, below in curves["anchored_below"].items():
        reached = [r for r in rows if at_anchored[curve][r] is not None]
        assert below == (None if not reached else all(anchored[r] < at_anchored[curve][r] for r in reached))
    assert "ICE anchored below the curve on every attack row" in (tmp_path / "red_team_curves_tiny.md").read_text()
    for margin in curves["erasure_margins"]:  # one concept per family: its own point, section 1's reading
        (name,) = [n for n, r in data["per_concept"].items() if r["family"] == margin["family"]]
        own = data["per_concept"][name]
        uce_points = [(own[k]["collateral_near"], own[k]["erasure"]) for k in ("UCE lam=3000", "UCE lam=30")]
        expected = own["ICE"]["erasure"] - frontier(uce_points, own["ICE"]["collateral_near"])
        assert margin["UCE"] == pytest.approx(expected) and "UCE as published" not in margin  # a point, not a curve
    assert len(curves["erasure_margins"]) == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        run_main("red_team", "--tiny", "--curves", "--methods", "RECE", "--out", str(tmp_path))
    assert refused.value.code == 2 and "--curves runs its own points" in capsys.readouterr().err


@pytest.mark.slow
def test_red_team_tiny(tmp_path, capsys):
    """Every row of the tiny run is a rate; a second run with ``--methods`` redoes only its rows and keeps the
    others' (ICE always runs: the 'original' column is its unedited model); ``--curves`` on the same cache agrees."""
    import red_team
    from red_team import TINY_RING, _cache_key

    from ice_lightning.evaluation.devset import dev_concept

    cache = tmp_path / "ring.json"  # not there yet: the run creates it
    run_main("red_team", "--tiny", "--methods", "RECE", "UCE", "--out", str(tmp_path), "--ring-cache", str(cache),
             "--ice-setting", 'soft={"erase_expansion": 3.0}')  # fmt: skip
    # stderr is not a terminal, as with `2> log`: our progress comes as plain lines, no bar frames (no \r)
    ours = [line for line in capsys.readouterr().err.split("\n") if line.startswith(("red-teaming:", "encoding"))]
    assert "red-teaming: 4/4 concept done in" in ours[-1] and not any("\r" in line for line in ours)
    first = _load(tmp_path, "red_team_tiny")
    searched = json.loads(cache.read_text())  # every concept's two searches, stored as the report shows them
    assert len(searched) == 8
    for name, concept in first["per_concept"].items():
        assert [t for t, _, _ in searched[_cache_key(dev_concept(name), TINY_RING)]["text"]] == concept["_ring_prompts"]
    _check_curves(tmp_path, cache, first, capsys)
    assert json.loads(cache.read_text()) == searched  # the curves found every prompt there and searched none
    # one concept's entry replaced by its own held-out prompts: the next run must take them instead of searching
    seeded = [p for p, _ in dev_concept("Van Gogh").spec().leakage_pairs()]
    key = _cache_key(dev_concept("Van Gogh"), TINY_RING)
    cache.write_text(json.dumps({**searched, key: {"text": [[p.text, *p.span] for p in seeded]}}))
    assert {q["metric"] for q in first["quality"]} == set(red_team.QUALITY)
    assert all(0 < q[m] < 1.2 for q in first["quality"] for m in first["methods"])
    # a saved report from before a quality metric and the white-box floor existed: its kept rows read "-" there, the
    # rerun ones a number
    saved = _load(tmp_path, "red_team_tiny")
    for concept in saved["per_concept"].values():
        for missing in ("collateral_far_read", "whitebox@0.0", "whitebox@0.0_original"):
            del concept["RECE"][missing]
    (tmp_path / "red_team_tiny.json").write_text(json.dumps(saved))
    run_main("red_team", "--tiny", "--methods", "ICE", "--out", str(tmp_path), "--ring-cache", str(cache))
    capsys.readouterr()
    data = _load(tmp_path, "red_team_tiny")
    other = tmp_path / "notes.json"  # someone's own JSON file: refused before the run, and left as it was
    other.write_text('{"a": 1}')
    with pytest.raises(SystemExit) as refused:
        red_team.main(["--tiny", "--out", str(tmp_path), "--ring-cache", str(other)])
    assert refused.value.code == 2 and "is not a Ring-A-Bell prompt cache" in capsys.readouterr().err
    assert other.read_text() == '{"a": 1}'
    assert data["per_concept"]["Van Gogh"]["_ring_prompts"] == [p.text for p in seeded]
    assert data["per_concept"]["Van Gogh"]["ICE"]["ring_a_bell_original"] == 1.0  # the concept itself, unedited
    stored = json.loads(cache.read_text())  # the seeded entry as it was, the others as the first run stored them
    assert stored == {**searched, key: {"text": [[p.text, *p.span] for p in seeded]}}
    assert list(data["methods"]) == ["ICE", "UCE", "RECE", "soft"]  # in the report's order
    assert data["methods"]["soft"] == ["ice", {"erase_expansion": 3.0}]
    assert "soft" not in red_team.METHODS  # a run's own settings never leak into the next call's table
    for concept in data["per_concept"].values():  # the setting reached the solve: a softer erasure
        assert concept["soft"]["erasure"] < concept["ICE"]["erasure"]
    attacks = {r["attack"] for r in data["rows"]}
    assert attacks == {"paraphrase", "ring_a_bell", "ring_a_bell_held_out", "whitebox@0.0", "whitebox@1.0"}
    for r in data["rows"]:
        kept_before = r["attack"] == "whitebox@0.0"
        assert all(0 <= r[m] <= 1 for m in ("original", "ICE", "UCE", *([] if kept_before else ["RECE"]), "soft"))
        assert (r["RECE"] is None) == kept_before
    # the floor (the concept's tokens deleted, no attacker input) is never above the full-budget attack
    for name, concept in first["per_concept"].items():
        for label in ("ICE", "UCE", "RECE", "soft"):
            assert concept[label]["whitebox@0.0"] <= concept[label]["whitebox@1.0"], (name, label)
    assert re.search(r"\| all \| whitebox@0.0 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| - \|",
                     (tmp_path / "red_team_tiny.md").read_text())  # original, ICE, UCE, RECE
    assert len(data["per_concept"]) == 4  # one concept per family
    far_read = next(q for q in data["quality"] if q["metric"] == "collateral_far_read")
    assert far_read["RECE"] is None and far_read["UCE"] > 0 and far_read["ICE"] > 0
    md = (tmp_path / "red_team_tiny.md").read_text()
    assert re.search(r"\| collateral_far_read \| [0-9.]+ \| [0-9.]+ \| - \|", md)  # ICE, UCE, RECE
    for name, concept in data["per_concept"].items():
        for kept in ("RECE", "UCE", "soft"):  # kept, not rerun
            was = {k: v for k, v in first["per_concept"][name][kept].items()
                   if kept != "RECE" or k not in ("collateral_far_read", "whitebox@0.0", "whitebox@0.0_original")}
            assert concept[kept] == was


def test_layer_rows_replace_every_text_reading_projection():
    from _common import minilm_pipeline, with_layer_rows

    def projections(pipe):
        return {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules()
                if n.endswith(("attn2.to_k", "attn2.to_v"))}  # fmt: skip

    before = projections(minilm_pipeline())
    first, second = (projections(with_layer_rows(minilm_pipeline(), 48)) for _ in range(2))
    assert set(first) == set(before) and len(first) == 8
    for name, w in first.items():
        assert w.shape == (48, before[name].shape[1])
        assert torch.equal(w, second[name])  # the same seed, the same layers
        assert abs(float(w.std()) / float(before[name].std()) - 1) < 0.05
    with pytest.raises(ValueError, match="at least one output row"):
        with_layer_rows(minilm_pipeline(), 0)


def test_red_team_layer_rows_name_their_own_report(tmp_path, capsys):
    """``--layer-rows`` writes ``*_rowsR`` beside the plain report (which it never reads), and refuses a width below 1
    before anything runs."""
    import argparse

    import red_team

    args = argparse.Namespace(layer_rows=48, tiny=True)
    assert red_team._suffix(args) == "_rows48" and "random with 48 rows" in red_team._width_note(args)
    assert red_team._suffix(argparse.Namespace(layer_rows=None)) == ""
    with pytest.raises(SystemExit) as refused:
        red_team.main(["--tiny", "--layer-rows", "0", "--out", str(tmp_path)])
    assert refused.value.code == 2 and "--layer-rows must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_curve_is_read_between_its_points_and_at_its_ends_only_within_the_match():
    from red_team import MATCH, read_at

    points = [{"collateral_near": 0.2, "ring": 0.6}, {"collateral_near": 0.3, "ring": 0.4}]
    assert read_at(points, 0.25, "ring") == pytest.approx(0.5)
    assert read_at(points, 0.275, "ring") == pytest.approx(0.45)
    assert read_at(points, 0.2 - MATCH / 2, "ring") == 0.6  # just below the curve: its end point counts as matched
    assert read_at(points, 0.3 + 2 * MATCH, "ring") is None  # beyond: not reached, never extrapolated
    assert read_at(points[:1], 0.2 + MATCH / 2, "ring") == 0.6  # a one-point recipe
    assert read_at(points[:1], 0.25, "ring") is None


@pytest.mark.slow
def test_shapes_tiny(tmp_path, capsys):
    import shapes

    run_main("shapes", "--tiny", "--methods", "uce", "--ice-setting", 'soft={"erase_expansion": 3}', "--restarts", "2",
             "--attack-prompts", "1", "--discrete-words", "6", "--out", str(tmp_path))  # fmt: skip
    # a second run of another method keeps the first run's rows, its own setting's included (that row's label is
    # not a built-in method: sorting the report once raised on it)
    run_main("shapes", "--tiny", "--methods", "ice", "--attack-prompts", "1", "--out", str(tmp_path))
    data = _load(tmp_path, "shapes_tiny")
    rows = data["rows"]
    assert [(r["model"], r["concept"], r["split"]) for r in rows] == [
        ("shapes-image", "red", s) for _ in ("ice", "uce", "soft") for s in ("seen", "paraphrase")
    ]
    assert [r["method"] for r in rows[::2]] == ["ice", "uce", "soft"]  # built-in rows in their order, then settings
    assert data["methods"]["soft"] == ["ice", {"erase_expansion": 3}] and "soft" not in shapes.METHODS
    for r in rows:
        assert 0 <= r["presence_after"] <= 1 and r["min_retention"] >= 0
        assert r["erased_blank"] + r["erased_garbled"] + r["erased_replaced"] + r["presence_after"] == pytest.approx(1)
        assert set(r["attack_presence"]) == ({"0.5"} if r["method"] == "ice" else {"0.5", "discrete"})
        assert all(0 <= v <= 1 for v in r["attack_presence"].values())
    assert "| soft |" in (tmp_path / "shapes_tiny.md").read_text()
    # the yardstick: the unedited model attacked from the guide's prompts; it keeps every method's row
    with pytest.raises(SystemExit) as refused:
        run_main("shapes", "--tiny", "--reference", "--methods", "ice", "--out", str(tmp_path))
    assert refused.value.code == 2 and "--reference runs no method" in capsys.readouterr().err
    run_main("shapes", "--tiny", "--reference", "--attack-prompts", "1", "--discrete-words", "6",
             "--out", str(tmp_path))  # fmt: skip
    again = _load(tmp_path, "shapes_tiny")
    assert again["rows"] == rows
    [ref] = again["reference"]
    assert (ref["model"], ref["concept"], ref["guide"], set(ref["attack_presence"])) == (
        "shapes-image", "red", "green", {"0.5", "discrete"})
    assert 0 <= ref["presence"] <= 1 and all(0 <= v <= 1 for v in ref["attack_presence"].values())
    md = (tmp_path / "shapes_tiny.md").read_text()
    assert "## The yardstick" in md and "| shapes-image | red | green |" in md and "| soft |" in md
    yardstick = md.split("## The yardstick")[1]
    assert "| attack success, budget 0.5 | discrete attack success |" in yardstick


@pytest.mark.slow
def test_shapes_resurgence_tiny(tmp_path):
    run_main("shapes_resurgence", "--tiny", "--out", str(tmp_path))
    data = _load(tmp_path, "shapes_resurgence_tiny")
    runs, dropped = data["runs"], data["dropped"]
    plain, caption, detector = ("ICECallback every epoch, no filter", "ICECallback every epoch + caption filter",
                                "ICECallback every epoch + detector filter")  # fmt: skip
    assert list(runs) == [plain, caption, detector]
    for hist in runs.values():
        assert [h["epoch"] for h in hist] == [0, 0]  # at fit start (after the erasure), then at the epoch's end
    assert runs[plain][0] == runs[caption][0] == runs[detector][0]
    # red samples are captioned without naming red: the caption filter finds none, the detector finds them
    assert dropped[plain] == {} and dropped[caption] == {"caption": 0}
    assert dropped[detector]["shapes_detector:red"] > 0
    assert (tmp_path / "shapes_resurgence_tiny.png").stat().st_size > 10_000


@pytest.mark.slow
def test_hardening_tiny(tmp_path):
    run_main("hardening", "--tiny", "--out", str(tmp_path))
    data = _load(tmp_path, "hardening_tiny")
    configs = [r["config"] for r in data["rows"]]
    assert configs == ["ICE erase_expansion=30.0, harden_rounds=0", "ICE erase_expansion=30.0",
                       "ICE erase_expansion=30.0, harden_rounds=0, context_expansion=0.0",
                       "ICE erase_expansion=2.0, metric=output, harden_rounds=1, harden_budget=None",
                       "ICE erase_expansion=10.0, harden_rounds=1, harden_metric=output, harden_expansion=0.3, "
                       "harden_budget=None",
                       "ICE erase_expansion=8.0, harden_rounds=1, harden_metric=output, harden_budget=0.01",
                       "ICE erase_expansion=30.0, hard_core=0.5"]
    assert all(r["rank"] > 0 and 0 < r["erasure"] for r in data["rows"])
    plain, default = data["rows"][:2]
    assert default["rank"] > plain["rank"]  # the default's hardening adds the adversary's directions
    assert data["rows"][-1]["erasure"] >= default["erasure"]  # the core only raises eigenvalues towards 1
    (summary,) = data["summary"]
    assert summary["concepts"] == 3 and summary["plain_near"] is not None
    assert set(summary) >= {"default_difference", "without_context_difference", "output_metric_difference",
                            "output_adversary_near", "output_adversary_difference", "adversary_budget_difference",
                            "hard_core_difference"}


@pytest.mark.slow
def test_finetune_speed_tiny(tmp_path):
    """Both loops run, each in its own process; the callback's applications are timed and what it holds counted."""
    run_script("benchmarks/finetune_speed.py", "--tiny", "--cases", "small", "--steps", "1", "--out", str(tmp_path))
    (row,) = _load(tmp_path, "finetune_speed_tiny")["rows"]
    assert row["diffusers"]["step_s"] > 0 and row["ice"]["step_s"] > 0 and row["ice"]["peak_mib"] > 100
    assert [a["reason"] for a in row["ice"]["applications"]][:2] == ["setup", "epoch_end"]
    assert 0 < row["ice"]["callback_held_mib"] < 10
